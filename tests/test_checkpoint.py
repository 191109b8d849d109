"""minifcn.checkpoint: atomic, pickle-free checkpoints and .npz/.safetensors weight files."""

import os
import pickle

import numpy
import pytest

from minifcn import checkpoint, nn, optim
from minifcn.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from minifcn.nn import init
from minifcn.tensor import Tensor


class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.score = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        return self.score(self.bn(self.conv1(x)))


def _x():
    return Tensor(numpy.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(numpy.float32))


def _trained(steps=2):
    """A Net and its SGD optimiser after a few steps (so momentum and running stats are set)."""
    net = Net()
    opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        (net(_x()) ** 2).mean().backward()
        opt.step()
    return net, opt


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        numpy.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


def test_checkpoint_round_trip_restores_model_optimizer_and_extras(tmp_path):
    net, opt = _trained()
    path = tmp_path / "ckpt.npz"
    extra = dict(iteration=1200, best_miou=0.625, note="fcn8s", scheduler={"iteration": 3, "base_lr": 0.1})
    save_checkpoint(path, net, opt, **extra)
    net2 = Net()
    opt2 = optim.SGD(net2.parameters(), lr=0.5)
    assert load_checkpoint(path, net2, opt2) == extra
    _assert_same_state(net, net2)
    assert opt2.lr == 0.1 and opt2.momentum == 0.9
    numpy.testing.assert_array_equal(opt2.state[0]["velocity"], opt.state[0]["velocity"])
    # and both continue identically
    for model, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        (model(_x()) ** 2).mean().backward()
        o.step()
    _assert_same_state(net, net2)


def test_checkpoint_layout_has_prefixed_names_and_no_object_arrays(tmp_path):
    net, opt = _trained()
    path = str(tmp_path / "ckpt.npz")
    save_checkpoint(path, net, opt, epoch=3)
    with numpy.load(path, allow_pickle=False) as npz:
        names = set(npz.files)
        assert {"model/conv1.weight", "model/bn.running_var", "optim/0.velocity", "optim/lr",
                "meta/format", "meta/extra", "meta/rng"} <= names
        assert all(npz[name].dtype != object for name in names)
    assert load_checkpoint(path, Net()) == {"epoch": 3}  # the optimiser part is optional on load


def test_save_leaves_no_temporary_files_and_replaces_the_old_checkpoint(tmp_path):
    net, _ = _trained()
    path = tmp_path / "last.npz"
    save_checkpoint(path, Net(), step=1)
    save_checkpoint(path, net, step=2)
    assert sorted(os.listdir(tmp_path)) == ["last.npz"]
    fresh = Net()
    assert load_checkpoint(path, fresh) == {"step": 2}
    _assert_same_state(net, fresh)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.npz"
    save_checkpoint(path, Net(), step=1)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.numpy, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, Net(), step=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.npz"]


def test_extras_must_be_json_serialisable(tmp_path):
    path = tmp_path / "c.npz"
    with pytest.raises(TypeError, match="'bad'.*JSON"):
        save_checkpoint(path, Net(), bad=numpy.ones(2))
    assert not os.listdir(tmp_path)


def test_a_pickled_object_array_is_refused(tmp_path):
    net = Net()
    arrays = {f"model/{k}": v for k, v in net.state_dict().items()}
    arrays["meta/format"] = numpy.array(1)
    arrays["meta/extra"] = numpy.array([{"evil": "payload"}], dtype=object)  # needs pickle to load
    path = tmp_path / "evil.npz"
    numpy.savez(path, **arrays)
    with pytest.raises(ValueError, match="refusing to load.*evil.npz.*pickled"):
        load_checkpoint(path, net)
    plain_pickle = tmp_path / "evil2.npz"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="evil2.npz.*not an .npz archive.*pickle"):
        load_checkpoint(plain_pickle, net)
    with pytest.raises(ValueError, match="evil.npz.*pickled"):
        load_weights(path, net)


def test_missing_file_is_file_not_found_naming_it(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz") as info:
        load_checkpoint(path, Net())
    assert info.value.filename == str(path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_weights(tmp_path / "nope.safetensors", Net())


def test_a_checkpoint_of_another_model_gives_the_strict_error(tmp_path):
    path = tmp_path / "other.npz"
    save_checkpoint(path, Net(width=8))
    net = Net(width=4)
    before = net.state_dict()
    with pytest.raises(nn.StateDictError) as info:
        load_checkpoint(path, net)
    text = str(info.value)
    assert "other.npz" in text and "conv1.weight" in text and "bn.running_mean" in text
    assert len(info.value.mismatched) == 7  # every parameter and buffer of width 8
    _assert_same_state_dict(net.state_dict(), before)


def _assert_same_state_dict(a, b):
    assert list(a) == list(b) and all(numpy.array_equal(a[k], b[k]) for k in a)


def test_optimizer_problems_are_found_before_the_model_is_changed(tmp_path):
    net, opt = _trained()
    path = tmp_path / "c.npz"
    save_checkpoint(path, net, opt)
    target = Net()
    before = target.state_dict()
    with pytest.raises(ValueError, match="not Adam"):
        load_checkpoint(path, target, optim.Adam(target.parameters()))
    _assert_same_state_dict(target.state_dict(), before)
    save_checkpoint(path, net)
    with pytest.raises(ValueError, match="no optimiser state"):
        load_checkpoint(path, target, optim.SGD(target.parameters(), lr=0.1))


def test_load_keeps_the_model_dtype(tmp_path):
    path = tmp_path / "c.npz"
    net, _ = _trained()
    save_checkpoint(path, net)
    double = Net().to(dtype=numpy.float64)
    load_checkpoint(path, double)
    assert all(p.dtype == numpy.float64 for p in double.parameters())
    numpy.testing.assert_array_equal(double.conv1.weight.data, net.conv1.weight.data.astype(numpy.float64))


def test_random_stream_is_saved_and_restored_on_request(tmp_path):
    path = tmp_path / "c.npz"
    init.manual_seed(7)
    save_checkpoint(path, Net())  # Net() draws from the stream before the save
    expected = init.generator().random(5)
    init.manual_seed(99)
    load_checkpoint(path, Net())  # without restore_rng the stream is left alone
    assert not numpy.array_equal(init.generator().random(5), expected)
    load_checkpoint(path, Net(), restore_rng=True)
    numpy.testing.assert_array_equal(init.generator().random(5), expected)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.npz"
    save_weights(path, Net())
    with pytest.raises(ValueError, match="not a minifcn checkpoint.*load_weights"):
        load_checkpoint(path, Net())


# ---- weight files ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["w.npz", "w.safetensors"])
def test_weights_round_trip(tmp_path, name):
    net, _ = _trained()
    path = tmp_path / name
    save_weights(path, net)
    assert os.listdir(tmp_path) == [name]
    other = Net()
    result = load_weights(path, other)
    assert result.missing == [] and result.unexpected == []
    _assert_same_state(net, other)
    numpy.testing.assert_array_equal(net.eval()(_x()).data, other.eval()(_x()).data)


def test_safetensors_file_is_readable_by_safetensors(tmp_path):
    from safetensors.numpy import load_file

    net = Net()
    save_weights(tmp_path / "w.safetensors", net)
    loaded = load_file(str(tmp_path / "w.safetensors"))
    _assert_same_state_dict(dict(sorted(loaded.items())), dict(sorted(net.state_dict().items())))


def test_load_weights_accepts_checkpoints_and_partial_loads(tmp_path):
    net, opt = _trained()
    save_checkpoint(tmp_path / "c.npz", net, opt)
    other = Net()
    load_weights(tmp_path / "c.npz", other)
    _assert_same_state(net, other)

    class Bigger(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Conv2d(2, 2, 1)

    bigger = Bigger()
    with pytest.raises(nn.StateDictError, match="(?s)c.npz.*missing.*extra.weight"):
        load_weights(tmp_path / "c.npz", bigger)
    result = load_weights(tmp_path / "c.npz", bigger, strict=False)
    assert result.missing == ["extra.weight", "extra.bias"]
    numpy.testing.assert_array_equal(bigger.conv1.weight.data, net.conv1.weight.data)


def test_weights_extension_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"\.npz or \.safetensors.*w\.pt"):
        save_weights(tmp_path / "w.pt", Net())
    with pytest.raises(ValueError, match="w.pkl"):
        load_weights(tmp_path / "w.pkl", Net())
