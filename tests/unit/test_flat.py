"""Layout: aligned offsets, views without copies, equality."""

import numpy as np
import pytest

from easgd_mpi.flat import ALIGN_FLOATS, Layout


def test_offsets_are_16_byte_aligned_and_views_share_memory():
    layout = Layout([("w", (3, 5)), ("b", (5,)), ("s", ()), ("z", (0,)), ("last", (2, 2))])
    assert all(s.offset % ALIGN_FLOATS == 0 for s in layout.specs)
    assert layout.size % ALIGN_FLOATS == 0
    flat = layout.zeros()
    views = layout.views(flat)
    views["w"][...] = 1.0
    views["last"][1, 1] = 7.0
    assert flat[layout["w"].offset : layout["w"].offset + 15].sum() == 15.0
    assert flat[layout["last"].offset + 3] == 7.0
    assert views["s"].shape == ()


def test_equality_records_and_errors():
    a = Layout([("w", (2, 2)), ("b", (2,))])
    assert a == Layout.from_shapes({"w": (2, 2), "b": (2,)})
    assert a != Layout([("w", (2, 2)), ("b", (3,))])
    assert a.to_records()[1] == {"name": "b", "shape": [2], "offset": 4}
    with pytest.raises(ValueError, match="duplicate"):
        Layout([("w", (1,)), ("w", (1,))])
    with pytest.raises(ValueError, match="layout needs"):
        a.views(np.zeros(3, dtype=np.float32))
