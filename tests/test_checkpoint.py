"""Checkpoints: round trip, atomic write, and every loading error with its message."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lfdeep_neuron.surrogate.checkpoint import (ArchitectureError, ChannelMismatchError, CheckpointError,
                                                CorruptCheckpointError, NormalizationError,
                                                SegmentMismatchError, load_surrogate, save_checkpoint)
from lfdeep_neuron.surrogate.mtl import MH, MMoE, MMoEEx
from lfdeep_neuron.surrogate.synthetic import synthetic_tables

torch.set_num_threads(1)


def _trained_like(cls, **over):
    torch.manual_seed(2)
    m = cls.from_config("tiny", **over)
    with torch.no_grad():                       # move away from the init so a lost weight would show
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    S = m.n_segments
    m.set_normalization(np.linspace(-72, -60, S), np.linspace(2, 5, S), v_rest=np.full(S, -75.0),
                        imem_mean=np.linspace(-0.1, 0.1, S), imem_std=np.full(S, 0.3))
    return m


def _save(tmp_path, m, name="m.pt", **kw):
    segs, syns = synthetic_tables(m.n_segments)
    kw.setdefault("provenance", {"data": "synthetic", "neuron_version": "9.0.2", "seed": np.int64(3)})
    kw.setdefault("metrics", {"rmse_mV": np.float32(1.25)})
    return save_checkpoint(tmp_path / name, m, segments=segs, synapses=syns, dt_ms=1.0, **kw), segs, syns


def _edit(path, fn):
    ckpt = torch.load(path, weights_only=True)
    fn(ckpt)
    torch.save(ckpt, path)


@pytest.mark.parametrize("cls", [MH, MMoE, MMoEEx])
def test_round_trip(tmp_path, cls):
    m = _trained_like(cls, imem_tasks=True)
    path, segs, syns = _save(tmp_path, m)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]       # no temporary file left behind
    loaded = load_surrogate(path)
    assert type(loaded) is cls and not loaded.training
    x = torch.rand(2, m.n_inputs, 20)
    with torch.no_grad():
        a, b = m.eval()(x), loaded(x)
    for u, w in zip((a.v, a.spike_logit, a.imem), (b.v, b.spike_logit, b.imem)):
        assert torch.equal(u, w)
    for k, v in m.normalization().items():
        assert torch.equal(getattr(loaded, k), v)
    meta = loaded.meta
    assert list(meta["segments"]["name"]) == list(segs["name"])
    np.testing.assert_array_equal(meta["segments"]["xyz_mid"], segs["xyz_mid"])
    np.testing.assert_array_equal(meta["synapses"]["type"], syns["type"])
    assert meta["dt_ms"] == 1.0 and meta["provenance"]["neuron_version"] == "9.0.2"
    assert meta["provenance"]["seed"] == 3 and meta["metrics"]["rmse_mV"] == pytest.approx(1.25)
    if cls is MMoEEx:
        assert torch.equal(loaded.mask, m.mask)
    # expected_segments: count, names and a segment table all accepted when they match
    for expected in (m.n_segments, list(segs["name"]), segs):
        load_surrogate(path, expected_segments=expected)


def test_missing_file_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_surrogate(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CorruptCheckpointError, match="not a readable torch checkpoint"):
        load_surrogate(junk)
    path, _, _ = _save(tmp_path, _trained_like(MMoE))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="corrupt or truncated"):
        load_surrogate(truncated)
    other = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, other)
    with pytest.raises(CorruptCheckpointError, match="not an lfdeep-neuron surrogate checkpoint"):
        load_surrogate(other)
    _edit(path, lambda c: c.pop("state_dict"))
    with pytest.raises(CorruptCheckpointError, match=r"lacks required keys \['state_dict'\]"):
        load_surrogate(path)


def test_architecture_errors(tmp_path):
    path, _, _ = _save(tmp_path, _trained_like(MMoE))
    _edit(path, lambda c: c.update(arch="transformer"))
    with pytest.raises(ArchitectureError, match="unknown arch 'transformer'; expected one of mh, mmoe, mmoeex"):
        load_surrogate(path)
    # MH weights labelled as MMoE
    path, _, _ = _save(tmp_path, _trained_like(MH), name="mh.pt")
    _edit(path, lambda c: c.update(arch="mmoe"))
    with pytest.raises(ArchitectureError, match="the weights do not fit arch 'mmoe'"):
        load_surrogate(path)
    # an edited config that no longer matches the weights
    path, _, _ = _save(tmp_path, _trained_like(MH), name="mh2.pt")
    _edit(path, lambda c: c["config"].update(channels=[16, 4]))
    with pytest.raises(ArchitectureError, match="do not fit arch 'mh'"):
        load_surrogate(path)
    _edit(path, lambda c: c["config"].update(bogus=1))
    with pytest.raises(ArchitectureError, match="invalid config for arch 'mh'"):
        load_surrogate(path)


def test_segment_count_mismatches(tmp_path):
    m = _trained_like(MMoE)
    path, segs, _ = _save(tmp_path, m)
    with pytest.raises(SegmentMismatchError, match=r"segment counts disagree \(.*expected: 642"):
        load_surrogate(path, expected_segments=642)
    names = list(segs["name"])
    names[2], names[3] = names[3], names[2]
    with pytest.raises(SegmentMismatchError, match=r"segment order differs .* at 2 positions; first at index 2: "
                                                   r"checkpoint 'dend\[1\]', expected 'dend\[2\]'"):
        load_surrogate(path, expected_segments=names)
    _edit(path, lambda c: c["segments"].update(name=c["segments"]["name"][:-1]))
    with pytest.raises(SegmentMismatchError, match="segment table: 5"):
        load_surrogate(path)
    path, _, _ = _save(tmp_path, m, name="b.pt")
    _edit(path, lambda c: c["config"].update(n_segments=7))
    with pytest.raises(SegmentMismatchError, match=r"config n_segments: 7, weights \(towers\): 6"):
        load_surrogate(path)


def test_channel_mismatch(tmp_path):
    path, _, _ = _save(tmp_path, _trained_like(MH))
    _edit(path, lambda c: c["synapses"].update(syn_idx=c["synapses"]["syn_idx"][:4]))
    with pytest.raises(ChannelMismatchError, match="config has 10 input channels but the channel table has 4 rows"):
        load_surrogate(path)


def test_normalization_errors(tmp_path):
    m = _trained_like(MMoE, imem_tasks=True)
    path, _, _ = _save(tmp_path, m)
    _edit(path, lambda c: c.pop("normalization"))
    with pytest.raises(NormalizationError, match="has no normalization"):
        load_surrogate(path)
    path, _, _ = _save(tmp_path, m, name="b.pt")
    _edit(path, lambda c: c["normalization"].pop("imem_std"))
    with pytest.raises(NormalizationError, match=r"normalization lacks \['imem_std'\]"):
        load_surrogate(path)
    path, _, _ = _save(tmp_path, m, name="c.pt")
    _edit(path, lambda c: c["normalization"]["v_std"].__setitem__(1, 0.0))
    with pytest.raises(NormalizationError, match="v_std has non-positive entries"):
        load_surrogate(path)
    path, _, _ = _save(tmp_path, m, name="d.pt")
    _edit(path, lambda c: c["normalization"]["v_mean"].__setitem__(0, float("nan")))
    with pytest.raises(NormalizationError, match="v_mean contains non-finite"):
        load_surrogate(path)
    path, _, _ = _save(tmp_path, m, name="e.pt")
    _edit(path, lambda c: c["normalization"].update(v_mean=c["normalization"]["v_mean"][:3]))
    with pytest.raises(SegmentMismatchError, match="normalization v_mean: 3"):
        load_surrogate(path)
    assert issubclass(NormalizationError, CheckpointError) and issubclass(CheckpointError, ValueError)


def test_bundled_checkpoint_follows_models_default(tmp_path):
    from lfdeep_neuron.surrogate.checkpoint import MODELS_DIR, bundled_checkpoint

    assert bundled_checkpoint(tmp_path / "none") is None and bundled_checkpoint(tmp_path) is None
    (tmp_path / "b.pt").write_bytes(b"x")
    (tmp_path / "a.pt").write_bytes(b"x")
    assert bundled_checkpoint(tmp_path) == tmp_path / "a.pt"             # no DEFAULT: first by name
    (tmp_path / "DEFAULT").write_text("b.pt\n")
    assert bundled_checkpoint(tmp_path) == tmp_path / "b.pt"
    (tmp_path / "DEFAULT").write_text("gone.pt\n")
    with pytest.raises(FileNotFoundError, match="names 'gone.pt'"):
        bundled_checkpoint(tmp_path)
    # the repository's own models/: its DEFAULT (if any) names a checkpoint that loads
    if (MODELS_DIR / "DEFAULT").is_file():
        from lfdeep_neuron.surrogate.checkpoint import load_surrogate

        model = load_surrogate(bundled_checkpoint())
        assert model.n_segments == 642 and model.n_channels == 1278
