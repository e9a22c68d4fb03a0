"""The CSI services' side of the one translator (control/grpc_errors.py), which the node
agent's API uses too."""

from control.grpc_errors import CODES, ERRORS, code_for, translated, translated_stream

__all__ = ["CODES", "ERRORS", "code_for", "translated", "translated_stream"]
