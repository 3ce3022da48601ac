"""MH / MMoE / MMoEEx: shapes, batched towers and gates against per-task references, causality,
exclusivity masks, configs, and that each architecture can fit a small synthetic sequence."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lfdeep_neuron.surrogate.mtl import CONFIGS, MH, MMoE, MMoEEx, build_model, make_config
from lfdeep_neuron.surrogate.synthetic import SyntheticDataset
from lfdeep_neuron.surrogate.train import base_task_weights, prepare_batch, task_losses

torch.set_num_threads(1)
ARCH_CLASSES = [MH, MMoE, MMoEEx]


def _model(cls, **over):
    torch.manual_seed(0)
    m = cls.from_config("tiny", **over)
    m.set_normalization(torch.linspace(-70, -60, m.n_segments), torch.linspace(1, 3, m.n_segments))
    return m.eval()


@pytest.mark.parametrize("cls", ARCH_CLASSES)
def test_paper_config_sizes_and_output_shapes(cls):
    m = cls.from_config("paper")
    assert (m.n_channels, m.n_segments, m.n_inputs, m.n_tasks) == (1278, 642, 1278 + 642, 643)
    assert m.receptive_field == 1 + 2 * 9 * (1 + 2 + 4)       # kernel 10, dilations 1, 2, 4: 127 ms >= 100 ms
    assert m.arch == {"MH": "mh", "MMoE": "mmoe", "MMoEEx": "mmoeex"}[cls.__name__]
    tower = m.towers.w1.shape
    assert tower == (643, 8, 25 if cls is MH else 10)
    if cls is not MH:
        assert m.n_experts == 5 and m.gate_w.shape == (8, 5 * 643)   # gates read the 8-wide compressor only
    v, s = m.eval()(torch.rand(1, m.n_inputs, 7))
    assert v.shape == (1, 642, 7) and s.shape == (1, 7)


def test_parameter_counts_of_named_configs():
    counts = {(name, cls.arch): cls.from_config(name).num_parameters()
              for name in CONFIGS for cls in ARCH_CLASSES}
    # exclusivity only masks gates: MMoEEx has exactly MMoE's parameters
    for name in CONFIGS:
        assert counts[(name, "mmoe")] == counts[(name, "mmoeex")]
    # the first layer dominates: experts x (1920 inputs x 32 channels x 10 taps) for the paper MMoE
    assert counts[("paper", "mmoe")] > 5 * 1920 * 32 * 10
    assert counts[("paper", "mh")] < counts[("paper", "mmoe")]


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        make_config("huge")
    with pytest.raises(ValueError, match=r"unknown config keys \['chanels'\]"):
        MMoE.from_config("tiny", chanels=(4,))
    with pytest.raises(ValueError, match="unknown arch 'moe'"):
        build_model("moe", "tiny")
    with pytest.raises(ValueError, match="3 dilations for 2 TCN blocks"):
        make_config("tiny", dilations=(1, 2, 4))
    with pytest.raises(ValueError, match="residual=True needs feedback=True"):
        make_config("tiny", residual=True, feedback=False)
    m = _model(MH)
    with pytest.raises(ValueError, match=r"has 10 input channels; the model expects 16 \(10 synaptic \+ 6 feedback"):
        m(torch.zeros(1, 10, 5))


@pytest.mark.parametrize("cls", ARCH_CLASSES)
def test_towers_and_gates_match_per_task_reference(cls):
    """The batched towers / gates / mixture equal a straightforward loop over tasks and experts."""
    m = _model(cls)
    x = torch.rand(2, m.n_inputs, 9)
    with torch.no_grad():
        y = m(x, all_tasks=True)                                      # [B, n_tasks, T]
        xp = m.backbone_inputs(x)
        ref = torch.empty_like(y)
        tw = m.towers
        if cls is MH:
            h = m.trunk(xp)                                           # [B, C, T]
            feats = [h] * m.n_tasks
        else:
            f = m.experts(xp).view(2, m.n_experts, m.expert_width, 9)  # [B, E, C, T]
            comp = m.compressor(xp)                                   # [B, K, T]
            feats = []
            for n in range(m.n_tasks):
                logits = torch.einsum("bkt,ke->bet", comp, m.gate_w.view(-1, m.n_experts, m.n_tasks)[:, :, n])
                logits = logits + m.gate_b[:, n][None, :, None]
                if cls is MMoEEx:
                    logits[:, ~m.mask[n]] = float("-inf")
                g = torch.softmax(logits, dim=1)                      # [B, E, T]
                feats.append(sum(g[:, e, None] * f[:, e] for e in range(m.n_experts)))
        for n in range(m.n_tasks):
            z = F.elu(torch.einsum("bct,ch->bht", feats[n], tw.w1[n]) + tw.b1[n][None, :, None])
            ref[:, n] = torch.einsum("bht,h->bt", z, tw.w2[n]) + tw.b2[n]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_mmoeex_exclusivity_mask():
    m = MMoEEx.from_config("paper", exclusivity=0.3, mask_seed=3)
    mask = m.mask
    assert mask.shape == (643, 5) and mask.any(dim=1).all()          # every task keeps an expert
    frac_dropped = 1 - mask.float().mean().item()
    assert 0.25 < frac_dropped < 0.35
    assert torch.equal(mask, MMoEEx.from_config("paper", exclusivity=0.3, mask_seed=3).mask)
    assert not torch.equal(mask, MMoEEx.from_config("paper", exclusivity=0.3, mask_seed=4).mask)
    g = m.gates(torch.rand(4, m.compressor.c_out))                    # [R, E, n_tasks]
    assert torch.all(g.transpose(1, 2)[:, ~mask] == 0)               # masked entries are exactly zero
    torch.testing.assert_close(g.sum(dim=1), torch.ones(4, 643))
    full = MMoEEx.from_config("tiny", exclusivity=0.0)
    assert full.mask.all()


@pytest.mark.parametrize("cls", ARCH_CLASSES)
def test_causal_with_receptive_field(cls):
    m = _model(cls, kernel=3, dilations=(1, 3))
    R = m.receptive_field
    assert R == 1 + 2 * 2 * (1 + 3)
    T, t = 40, 30
    x = torch.rand(1, m.n_inputs, T)
    with torch.no_grad():
        base = m(x, all_tasks=True)
        late = x.clone(); late[..., t + 1:] += 1.0                   # the future
        inside = x.clone(); inside[..., t - R + 1] += 1.0             # oldest step still seen at t
        outside = x.clone(); outside[..., t - R] += 1.0               # just beyond the receptive field
        y_late, y_in, y_out = (m(z, all_tasks=True) for z in (late, inside, outside))
    assert torch.equal(y_late[..., :t + 1], base[..., :t + 1])
    assert (y_in[..., t] - base[..., t]).abs().max() > 1e-6        # (deterministic: unchanged inputs give equal bits)
    assert torch.equal(y_out[..., t], base[..., t])


def test_units_and_prediction_tuple():
    m = _model(MMoE, imem_tasks=True, residual=True)
    v_mV = torch.randn(2, m.n_segments, 5) * 4 - 65
    torch.testing.assert_close(m.to_mV(m.to_z(v_mV)), v_mV)
    torch.testing.assert_close(m.to_z(v_mV)[:, :, 0], m.to_z(v_mV[:, :, 0]))   # [B,S,T] and [N,S] agree
    out = m(m.make_inputs(torch.rand(2, m.n_channels, 5), v_mV))
    v, s = out
    assert v.shape == (2, m.n_segments, 5) and s.shape == (2, 5)
    assert out.imem.shape == (2, m.n_segments, 5) and out.v is v and out.spike_logit is s
    with pytest.raises(ValueError, match="pass v_prev_mV"):
        m.make_inputs(torch.rand(2, m.n_channels, 5))


@pytest.mark.parametrize("arch", ["mh", "mmoe", "mmoeex"])
def test_each_architecture_overfits_a_small_sequence(arch):
    ds = SyntheticDataset(None, "train", window_ms=200, stride_ms=200, n_segments=6, n_sims=2, duration_ms=400)
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ds[0]}
    torch.manual_seed(0)
    m = build_model(arch, "tiny", n_segments=6, n_channels=10)
    m.set_normalization(ds.stats["v_mean"], ds.stats["v_std"], ds.stats["v0"])
    x, tgt = prepare_batch(m, batch, "cpu")
    w = base_task_weights(m, spike_weight=1.0, imem_weight=1.0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    history = []
    for _ in range(300):
        loss = (w * task_losses(m, m(x, all_tasks=True), tgt)).sum()
        history.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[0] / min(history[-10:]) >= 10.0, (history[0], history[-10:])


def test_local_synaptic_features():
    """config.local_taus: each segment's tower reads exponential traces of its own two channels."""
    from lfdeep_neuron.surrogate.mtl import default_local_channels

    ch = default_local_channels(6, 10)                       # tiny: 5 synaptic segments 1..5
    assert ch[0].tolist() == [10, 10] and ch[1].tolist() == [0, 5] and ch[5].tolist() == [4, 9]
    assert default_local_channels(642, 1278)[639].tolist() == [638, 1277]
    assert default_local_channels(642, 1278)[640:].eq(1278).all()      # axon stubs: none
    with pytest.raises(ValueError, match="channel layout"):
        default_local_channels(3, 10)
    m = MMoE.from_config("tiny", local_taus=(2.0, 10.0), imem_tasks=True)
    assert m.n_local == 4 and m.towers.w_loc.shape == (m.n_tasks, 4, m.config.tower_soft)
    u = torch.zeros(1, m.n_channels, 12)
    u[0, 2, 3] = 1.0                                          # excitatory channel 2 = segment 3, step 3
    u[0, 7, 5] = 0.5                                          # inhibitory channel 7 = segment 3, step 5
    tr = m.local_traces(u, block=5)                           # [B, S, 2, K, T]; 12 steps = 2 blocks + 2
    S = m.n_segments
    assert tr.shape == (1, S, 2, 2, 12)
    k = torch.arange(12.0)
    exc = torch.where(k[:, None] >= 3, torch.exp(-(k - 3)[:, None] / torch.tensor([2.0, 10.0])), torch.zeros(1))
    torch.testing.assert_close(tr[0, 3, 0].t(), exc)
    rows = m.local_rows(tr[0].permute(3, 0, 1, 2).reshape(12, S, 4))   # [T, n_tasks, 4]
    torch.testing.assert_close(rows[:, 3, :2], exc)           # voltage task of segment 3: its exc traces
    torch.testing.assert_close(rows[:, S + 1 + 3, :2], exc)   # its current task too
    assert rows[:, 3, 2:].abs().sum() > 0 and rows[:5, 3, 2:].abs().sum() == 0      # inh from step 5 on
    others = [s for s in range(2 * S + 1) if s not in (3, S + 1 + 3)]
    assert rows[:, others].abs().sum() == 0                   # no other task (spike task: the soma) sees it
    with pytest.raises(ValueError, match="positive"):
        MMoE.from_config("tiny", local_taus=(0.0,))


@pytest.mark.parametrize("T", [1, 7, 16, 45])
def test_blocked_local_traces_equal_the_recursion(T):
    """The training pass computes the local traces by blocks (in-block Toeplitz GEMM + a scan over blocks);
    they equal the 1-ms recursion the streaming step runs, for lengths below, at and across a block."""
    torch.manual_seed(0)
    m = MH.from_config("tiny", local_taus=(2.0, 8.0, 32.0))
    u = torch.rand(3, m.n_channels, T, dtype=torch.float64)
    m = m.double()
    seg = m.segment_inputs(u)
    y = torch.zeros(*seg.shape[:3], 3, dtype=torch.float64)
    ref = []
    for t in range(T):
        y = seg[..., t, None] + m.local_decay * y
        ref.append(y)
    torch.testing.assert_close(m.local_traces(u, block=16), torch.stack(ref, -1), rtol=1e-12, atol=1e-12)


def test_linear_local_towers_read_each_segments_traces():
    """Linear towers: the batched per-segment product over time equals w_loc . traces of each task's segment
    (voltage task s and current task S+1+s read segment s; the spike task nothing), step and sequence alike."""
    torch.manual_seed(1)
    m = MH.from_config("tiny", local_taus=(2.0, 8.0), imem_tasks=True, tower_soft=0, tower_hard=0)
    assert m.towers.linear
    B, T, S = 2, 9, m.n_segments
    traces = torch.randn(B, S, m.n_local, T)
    got = m._linear_local(traces).view(B, T, m.n_tasks)
    w = m.towers.w_loc
    want_v = torch.einsum("bsft,sf->bts", traces, w[:S])
    want_i = torch.einsum("bsft,sf->bts", traces, w[S + 1:])
    torch.testing.assert_close(got[..., :S], want_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[..., S + 1:], want_i, rtol=1e-5, atol=1e-5)
    assert got[..., S].abs().max() == 0
    one = m._linear_local(traces[..., :1])                    # the streaming layout, T = 1
    torch.testing.assert_close(one, got[:, 0], rtol=1e-5, atol=1e-5)


def test_branch_routing_sums_per_section():
    from lfdeep_neuron.surrogate.routing import BranchRouting, section_branches

    segments = {"sec_type": np.array(["soma", "dend", "dend", "apic", "apic", "dend"]),
                "sec_index": np.array([0, 0, 0, 0, 1, 1])}
    synapses = {"seg_idx": np.tile(np.arange(1, 6), 2), "type": np.repeat([0, 1], 5)}
    branch, kind, n = section_branches(segments, synapses)
    assert n == 4 and branch.tolist() == [0, 0, 1, 2, 3] * 2 and kind.tolist() == [0] * 5 + [1] * 5
    r = BranchRouting(10, n)
    r.set_branches(branch, kind)
    with torch.no_grad():
        r.log_w.copy_(torch.linspace(-1, 1, 10))
    u = torch.rand(2, 10, 7)
    out = r(u)                                                # [2, 8, 7]
    w = torch.exp(r.log_w)
    ref = torch.zeros(2, 8, 7)
    for c in range(10):                                       # reference: one channel at a time
        ref[:, branch[c] + n * kind[c]] += w[c] * u[:, c]
    torch.testing.assert_close(out, torch.log1p(ref))
    torch.testing.assert_close(r(u[:, :, 3]), out[:, :, 3])   # a column alone gives the same
    with pytest.raises(ValueError, match="branch indices must lie in 0..3"):
        r.set_branches(np.full(10, 4), kind)


def test_hay_cell_has_193_branches_and_spike_configs_build():
    from lfdeep_neuron.surrogate.checkpoint import bundled_checkpoint, load_checkpoint
    from lfdeep_neuron.surrogate.routing import section_branches

    path = bundled_checkpoint()       # any checkpoint of the Hay cell carries its segment and channel tables
    ck = load_checkpoint(path)
    segs = {k: (v.numpy() if hasattr(v, "numpy") else np.array(v)) for k, v in ck["segments"].items()}
    syns = {k: (v.numpy() if hasattr(v, "numpy") else np.array(v)) for k, v in ck["synapses"].items()}
    branch, kind, n = section_branches(segs, syns)
    assert n == 193 and np.bincount(kind).tolist() == [639, 639]
    for name in ("spike_lstm", "spike_elm"):
        for cls in ARCH_CLASSES:
            m = cls.from_config(name, n_branches=n)
            m.routing.set_branches(branch, kind)
            assert m.n_features == 2 * 193 and m.num_parameters() < 1_000_000, (name, cls, m.num_parameters())
            v, s = m.eval()(torch.zeros(1, m.n_inputs, 3))
            assert v.shape == (1, 642, 3) and s.shape == (1, 3)


@pytest.mark.parametrize("backbone", ["lstm", "elm"])
def test_recurrent_dropout_trains_only(backbone):
    """config.dropout drops trunk units in training; evaluation (and so stepping) never drops."""
    torch.manual_seed(0)
    m = MH.from_config("tiny", backbone=backbone, channels=(16,), n_segments=4, n_channels=8, dropout=0.5)
    x = torch.rand(2, m.n_inputs, 30)
    h_eval = m.trunk.eval()(m.backbone_inputs(x))
    h_train = m.trunk.train()(m.backbone_inputs(x))
    dropped = h_train == 0
    assert 0.3 < dropped.float().mean() < 0.7
    assert torch.allclose(h_train[~dropped], 2 * h_eval[~dropped], atol=1e-6)   # inverted dropout: kept x 1/(1-p)
    m.eval()
    state = m.trunk.initial_state(2)
    steps = []
    for t in range(x.shape[2]):
        h_t, state = m.trunk.step(m.backbone_inputs(x[..., t]), state)
        steps.append(h_t)
    assert torch.allclose(torch.stack(steps, -1), h_eval, atol=1e-5)


def test_fused_lstm_full_pass_equals_the_stepped_recurrence_with_gradients():
    """One LSTM's full pass runs through the fused kernel (CPU); it must equal the generic per-step recurrence
    in value and in every parameter's gradient."""
    from lfdeep_neuron.surrogate.recurrent import GroupedLSTM

    torch.manual_seed(1)
    g = GroupedLSTM(7, 5)
    x = torch.randn(3, 7, 40)
    fused = g(x)
    looped = super(GroupedLSTM, g).forward(x)          # the generic recurrence of the base class
    torch.testing.assert_close(fused, looped, rtol=0, atol=1e-5)
    grads = []
    for out in (fused, looped):
        g.zero_grad()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in g.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_branch_lstm_keeps_branches_apart_and_shares_their_weights():
    """backbone "branch_lstm": each branch's units read only that branch's (exc, inh) sums; all branches share
    one small LSTM (differing only by their embedding); the trunk reads the input and every branch unit."""
    from lfdeep_neuron.surrogate.branch import BranchLSTM

    torch.manual_seed(0)
    nb, k = 4, 3
    b = BranchLSTM(2 * nb + 1, 5, n_branches=nb, branch_units=k).eval()
    assert b.trunk.c_in == 2 * nb + 1 + nb * k and b.c_out == 5
    assert sum(p.numel() for p in b.branch.parameters()) == 4 * k * (2 + 2 + k) + 2 * 4 * k   # one shared LSTM
    x = torch.rand(2, 2 * nb + 1, 25)
    units = lambda inp: b.branch(b._branch_input(inp))[0].reshape(25, 2, nb, k)   # noqa: E731
    with torch.no_grad():
        base = units(x)
        x2 = x.clone()
        x2[:, nb + 1, 10] += 2.0                                     # inhibition of branch 1 at step 10
        moved = (units(x2) - base).abs().amax(dim=(1, 3))            # [T, nb]
    assert moved[:10].max() == 0                                     # causal
    assert moved[10:, 1].min() > 0 and moved[:, [0, 2, 3]].max() == 0   # only branch 1's units move
    with torch.no_grad():                                            # same input, different embedding -> differ
        same = x.clone()
        same[:, :nb] = same[:, :1]
        same[:, nb:2 * nb] = same[:, nb:nb + 1]
        u = units(same)
        b.embed.copy_(b.embed[:1].expand(nb, -1))
        v = units(same)
    assert (u[:, :, 0] - u[:, :, 1]).abs().max() > 1e-4 and (v[:, :, 0] - v[:, :, 1]).abs().max() < 1e-6


def test_branch_lstm_needs_routed_input():
    with pytest.raises(ValueError, match="branch_lstm.*n_branches >= 1"):
        MH.from_config("tiny", backbone="branch_lstm", channels=(4,), n_segments=3, n_channels=6)
    with pytest.raises(ValueError, match="branch_units must be >= 1"):
        make_config("spike_lstm", branch_units=0)
    m = MH.from_config("spike_lstm", backbone="branch_lstm", channels=(128,), spike_history=True, imem_tasks=True)
    # Exact count (issue 33, "Why" item 8: a range 800k-900k with no source passed e.g. unshared per-branch
    # LSTMs, +30,720, or a 3-d embedding). Source: the same model with the plain LSTM trunk is the bundled one,
    # 439,203 parameters (models/MODEL_CARD.md); branch_lstm adds per torch.nn.LSTM's 4h(in + h) + 8h:
    # the trunk's extra inputs (193 branches x 4 units) into 4 x 128 gates, one shared LSTM(2 + 2 -> 4),
    # and a 2-d embedding per branch.
    plain = MH.from_config("spike_lstm", channels=(128,), spike_history=True, imem_tasks=True)
    assert plain.config.backbone == "lstm" and plain.num_parameters() == 439_203
    nb, k, h = 193, 4, 128
    assert (m.config.n_branches, m.config.branch_units) == (nb, k)
    assert m.num_parameters() == 439_203 + 4 * h * nb * k + (4 * k * (4 + k) + 8 * k) + nb * 2
    v, s = m.eval()(torch.zeros(1, m.n_inputs, 3))
    assert v.shape == (1, 642, 3) and s.shape == (1, 3)
