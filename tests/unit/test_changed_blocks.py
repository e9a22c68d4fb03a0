from engine.changed_blocks import Range, delta_of_extents
from engine.fileops import FIEMAP_EXTENT_SHARED, Extent

K = 4096


def ext(offset, physical, length, flags=0):
    return Extent(offset * K, physical * K, length * K, flags)


def test_identical_maps_have_no_delta():
    base = [ext(0, 100, 10, FIEMAP_EXTENT_SHARED)]
    assert delta_of_extents(base, base) == []


def test_overwrite_inside_a_shared_extent():
    base = [ext(0, 100, 10)]
    target = [ext(0, 100, 4), ext(4, 500, 1), ext(5, 105, 5)]
    assert delta_of_extents(base, target) == [Range(4 * K, 1 * K)]


def test_new_data_in_a_hole_and_discarded_data():
    base = [ext(0, 100, 2), ext(8, 200, 2)]
    target = [ext(0, 100, 2), ext(4, 300, 2)]  # wrote 4-6, discarded 8-10
    assert delta_of_extents(base, target) == [Range(4 * K, 2 * K), Range(8 * K, 2 * K)]


def test_adjacent_changes_merge():
    base = [ext(0, 100, 4)]
    target = [ext(0, 700, 2), ext(2, 900, 2)]
    assert delta_of_extents(base, target) == [Range(0, 4 * K)]
