"""The buffer layout behind OneBufferAllReduce: averaged tensors as consecutive views of one shared buffer."""

import torch

from atlas_swarm.swarm.averagers import flat_buffer, spanned_buffer


def test_flat_buffer_views_tile_one_shared_buffer_in_order():
    views = flat_buffer([torch.Size([2, 3]), torch.Size([4]), torch.Size([1, 1])], torch.float64)
    assert [v.shape for v in views] == [torch.Size([2, 3]), torch.Size([4]), torch.Size([1, 1])]
    flat = spanned_buffer(views)
    assert flat is not None and flat.shape == (11,) and flat.dtype == torch.float64 and flat.is_shared()
    flat.copy_(torch.arange(11.0))
    assert views[1].tolist() == [6.0, 7.0, 8.0, 9.0] and views[2].item() == 10.0  # writes reach the views


def test_tensors_that_do_not_tile_one_buffer_in_order_are_left_alone():
    a, b = flat_buffer([torch.Size([3]), torch.Size([2])])
    assert spanned_buffer([b, a]) is None  # out of order
    assert spanned_buffer([a]) is not None and spanned_buffer([a]).shape == (3,)
    assert spanned_buffer([a, torch.zeros(2)]) is None  # another storage
    c, d = flat_buffer([torch.Size([2]), torch.Size([2])])
    assert spanned_buffer([c, d[1:]]) is None  # a gap
    assert spanned_buffer([]) is None
