"""The conformance suite's tests on mirrored volumes (`replicas: 3`, see conftest.py), in
mount and block mode. The same selection as tests/conformance/cluster/, which runs them on
local volumes."""

from tests.conformance.test_capabilities import (  # noqa: F401
    test_controller_capabilities,
    test_multi_node_modes_are_not_confirmed,
    test_node_capabilities,
    test_single_node_modes_are_supported,
    test_unknown_access_mode_is_invalid,
    test_validate_capabilities_of_the_wrong_access_type_is_not_confirmed,
)
from tests.conformance.test_controller_errors import (  # noqa: F401
    test_controller_error,
    test_snapshots_are_answered_as_advertised,
    test_unknown_volume_ids,
)
from tests.conformance.test_controller_publish import (  # noqa: F401
    test_attach_limit_plus_one_is_resource_exhausted,
    test_republish_with_other_readonly_is_already_exists,
    test_ten_identical_publishes_are_ok,
    test_unpublish_is_idempotent,
)
from tests.conformance.test_create_volume import (  # noqa: F401
    test_clone_of_an_existing_volume,
    test_create_volume_sizes,
    test_maximum_length_name,
    test_mutable_parameters_accepted,
    test_same_name_other_access_type_is_already_exists,
    test_same_name_other_size_is_already_exists,
    test_same_name_same_request_returns_the_same_volume,
    test_unknown_mutable_key_makes_nothing,
)
from tests.conformance.test_expand import (  # noqa: F401
    test_block_expansion_reaches_read_only_publishes_too,
    test_controller_expand_10_to_11_gib,
    test_controller_expand_answers_exactly,
    test_controller_expand_to_the_current_size_is_ok,
    test_expand_before_stage,
    test_expand_between_stage_and_publish,
    test_ext4_online_expansion,
    test_online_expansion,
)
from tests.conformance.test_identity import (  # noqa: F401
    test_plugin_capabilities_are_all_known,
    test_plugin_info_name_is_valid,
    test_probe_is_ok_and_ready,
)
from tests.conformance.test_list_volumes import (  # noqa: F401
    test_count_moves_by_exactly_one,
    test_entries_report_capacity_and_published_nodes,
    test_invalid_starting_token_is_aborted,
    test_negative_max_entries_is_invalid,
    test_pages_cover_every_volume_once,
    test_token_still_works_when_its_last_volume_is_deleted,
)
from tests.conformance.test_modify_volume import (  # noqa: F401
    test_invalid_modification_changes_nothing,
    test_tier_gold_works,
)
from tests.conformance.test_node_data import (  # noqa: F401
    test_data_survives_unstage_and_restage,
    test_read_only_publish_refuses_writes,
)
from tests.conformance.test_node_errors import test_node_error  # noqa: F401
from tests.conformance.test_node_errors import test_unknown_volume_ids as test_node_unknown_ids  # noqa: F401,E501
from tests.conformance.test_node_lifecycle import (  # noqa: F401
    test_cleanup_of_a_volume_never_staged,
    test_cleanup_of_another_volume_leaves_a_staged_one_alone,
    test_multi_writer_allows_a_second_target,
    test_read_only_publish_is_read_only_in_the_kernel,
    test_single_writer_refuses_a_second_target,
    test_stage_and_publish_ten_times_stack_nothing,
)
from tests.conformance.test_node_lifecycle import (  # noqa: F401
    test_republish_with_other_readonly_is_already_exists as test_node_republish_other_readonly,
)
from tests.conformance.test_node_stats import (  # noqa: F401
    published,
    test_stats_after_unpublish_is_not_found,
    test_stats_of_a_published_volume,
    test_stats_of_an_unknown_path_is_not_found,
)
from tests.conformance.test_snapshots import (  # noqa: F401
    test_create_from_source_and_missing_source,
    test_create_snapshot_errors,
    test_group_capability_and_plugin_service,
    test_group_snapshot_errors,
    test_names_idempotency_and_listing,
    test_snapshot_id_errors,
    test_unknown_ids_list_empty,
)
