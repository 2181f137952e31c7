import torch

from eplb.runtime.hashing import entry_hash, layer_key, mix32, mix32_int


def test_tensor_hash_matches_the_integer_definition():
    x = torch.tensor([0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789], dtype=torch.int64)
    assert mix32(x).tolist() == [mix32_int(v) for v in x.tolist()]


def test_entry_hash_is_a_bijection_of_the_index():
    h = entry_hash(1 << 16, layer_key(3, 7), torch.device("cpu"))
    assert h.unique().numel() == h.numel()
    assert int(h.min()) >= 0 and int(h.max()) < 1 << 32


def test_keys_differ_by_layer_and_seed():
    keys = {layer_key(seed, layer) for seed in range(4) for layer in range(64)}
    assert len(keys) == 4 * 64
