"""Streaming (one step at a time) equals the full-sequence pass, teacher-forced and closed loop."""
from __future__ import annotations

import pytest
import torch

from lfdeep_neuron.surrogate.backbone import state_map
from lfdeep_neuron.surrogate.mtl import MH, MMoE, MMoEEx
from lfdeep_neuron.surrogate.stream import Streamer, closed_loop

torch.set_num_threads(1)
ARCH_CLASSES = [MH, MMoE, MMoEEx]
TOL = dict(rtol=1e-5, atol=2e-5)


def _model(cls, **over):
    torch.manual_seed(1)
    # dilations 1, 3 with kernel 3: rings of 3 and 7 slots, wrapped many times over T = 60 steps
    cfg = dict(kernel=3, dilations=(1, 3), dropout=0.2, **over)
    m = cls.from_config("tiny", **cfg)
    m.set_normalization(torch.linspace(-70, -55, m.n_segments), torch.linspace(1, 6, m.n_segments),
                        v_rest=torch.full((m.n_segments,), -71.0),
                        imem_mean=torch.zeros(m.n_segments), imem_std=torch.full((m.n_segments,), 0.5))
    return m.eval()


def _stream(st: Streamer, x: torch.Tensor):
    """Step through x [B, C, T]; outputs stacked to [B, S, T], [B, T] (and imem)."""
    outs = [st.step(x[:, :, t]) for t in range(x.shape[2])]
    v = torch.stack([o[0] for o in outs], dim=-1)
    s = torch.stack([o[1] for o in outs], dim=-1)
    imem = torch.stack([o.imem for o in outs], dim=-1) if outs[0].imem is not None else None
    return v, s, imem


@pytest.mark.parametrize("cls", ARCH_CLASSES)
@pytest.mark.parametrize("over", [{}, {"imem_tasks": True, "residual": True},
                                  {"imem_tasks": True, "local_taus": (2.0, 7.0)}])
def test_teacher_forced_streaming_equals_full_pass(cls, over):
    m = _model(cls, **over)
    B, T = 4, 60
    x = torch.rand(B, m.n_inputs, T) * 2
    with torch.no_grad():
        full = m(x)
    st = m.streamer(B)
    v, s, imem = _stream(st, x)
    torch.testing.assert_close(v, full.v, **TOL)
    torch.testing.assert_close(s, full.spike_logit, **TOL)
    if over:
        torch.testing.assert_close(imem, full.imem, **TOL)
    assert (full.v.std() > 0.05) and (s.std() > 1e-3)               # outputs are not trivially constant


@pytest.mark.parametrize("cls", ARCH_CLASSES)
@pytest.mark.parametrize("over", [{}, {"local_taus": (3.0,)}])
def test_closed_loop_streaming_equals_full_pass_fed_its_own_outputs(cls, over):
    m = _model(cls, **over)
    B, T = 3, 50
    x_syn = torch.rand(B, m.n_channels, T) * 2
    v0 = torch.randn(B, m.n_segments) - 65
    out = closed_loop(m, x_syn, v0_mV=v0, output="z")
    assert out.v.shape == (B, m.n_segments, T) and out.spike_logit.shape == (B, T)
    # feedback of column t = own prediction of step t-1; of column 0 = the initial voltage
    fb = torch.cat([m.to_z(v0)[:, :, None], out.v[:, :, :-1]], dim=-1)
    with torch.no_grad():
        full = m(torch.cat([x_syn, fb], dim=1))
    torch.testing.assert_close(out.v, full.v, **TOL)
    torch.testing.assert_close(out.spike_logit, full.spike_logit, **TOL)
    # the default initial voltage is the model's v_rest
    out_rest = closed_loop(m, x_syn, output="mV")
    fb_rest = torch.cat([m.to_z(m.v_rest).expand(B, -1)[:, :, None], m.to_z(out_rest.v)[:, :, :-1]], dim=-1)
    with torch.no_grad():
        full_rest = m(torch.cat([x_syn, fb_rest], dim=1))
    torch.testing.assert_close(out_rest.v, m.to_mV(full_rest.v), rtol=1e-5, atol=1e-4)


def test_mV_output_and_switching_between_modes():
    m = _model(MMoE)
    B, T = 2, 30
    x = torch.rand(B, m.n_inputs, T)
    v_z, s_z, _ = _stream(m.streamer(B, output="z"), x)
    v_mV, s_mV, _ = _stream(m.streamer(B, output="mV"), x)
    torch.testing.assert_close(v_mV, m.to_mV(v_z), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(s_mV, s_z)
    # teacher-forced for 10 steps, then closed loop: the feedback continues from the last prediction
    st = m.streamer(B)
    first, _, _ = _stream(st, x[:, :, :10])
    rest, _, _ = _stream(st, x[:, :m.n_channels, 10:])
    fb = torch.cat([x[:, m.n_channels:, :10], first[:, :, -1:], rest[:, :, :-1]], dim=-1)
    with torch.no_grad():
        full = m(torch.cat([x[:, :m.n_channels], fb], dim=1))
    torch.testing.assert_close(torch.cat([first, rest], -1), full.v, **TOL)


def test_reset_all_and_some_cells():
    m = _model(MMoEEx)
    B, T = 3, 25
    x = torch.rand(B, m.n_channels, T)
    st = m.streamer(B)
    a, _, _ = _stream(st, x)
    st.reset()
    b, _, _ = _stream(st, x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)               # a reset forgets everything
    # reset only cell 1 half-way: cell 1 restarts from scratch, cells 0 and 2 carry on
    st.reset()
    h1, _, _ = _stream(st, x[:, :, :12])
    st.reset(cells=[1])
    h2, _, _ = _stream(st, x[:, :, 12:])
    fresh, _, _ = _stream(m.streamer(1), x[1:2, :, 12:])
    torch.testing.assert_close(h2[1:2], fresh, **TOL)
    torch.testing.assert_close(torch.cat([h1, h2], -1)[[0, 2]], a[[0, 2]], **TOL)


def test_state_is_constant_size_and_small():
    m = MMoE.from_config("paper").eval()
    st = m.streamer(2)
    before = st.state_bytes_per_cell()
    shapes = state_map(lambda s: s.shape, st.state)
    for _ in range(300):                                             # > 2x the receptive field
        st.step(torch.zeros(2, m.n_channels))
    assert st.state_bytes_per_cell() == before
    assert state_map(lambda s: s.shape, st.state) == shapes
    assert before < 1_000_000                                        # DESIGN target: <= 1 MB per cell
    # the first layer keeps pending sums of its 5 x 32 outputs for 9 steps ahead, not its 1920-wide input history
    first = st.state[0][0][0][0]                                     # experts, block 0, conv1
    assert first.shape == (2, 9, 5 * 32)


def test_step_input_errors():
    m = _model(MH)
    st = m.streamer(2)
    with pytest.raises(ValueError, match=r"x_t has 7 channels; expected 16 \(teacher-forced\) or 10"):
        st.step(torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"x_t must be \[n_cells=2, channels\]"):
        st.step(torch.zeros(3, 10))
    with pytest.raises(ValueError, match="output must be 'z' or 'mV'"):
        m.streamer(2, output="volts")
    with pytest.raises(ValueError, match=r"v0_mV must be \[S\] or \[cells, S\] with S = 6"):
        st.reset(v0_mV=torch.zeros(5))
    no_fb = MH.from_config("tiny", feedback=False).eval()
    st2 = no_fb.streamer(2)
    assert not st2.feedback and st2.step(torch.zeros(2, 10))[0].shape == (2, 6)
    # without feedback there is no loop to close: closed_loop is the plain (teacher-forced) forward pass
    x = torch.rand(2, 10, 30)
    torch.testing.assert_close(closed_loop(no_fb, x, output="z").v, no_fb(x).v, atol=1e-5, rtol=1e-5)


def test_streamer_made_in_inference_mode_steps_anywhere():
    """The co-simulation engine builds and steps streamers under torch.inference_mode()."""
    m = _model(MMoE)
    x = torch.rand(3, m.n_channels)
    ref = m.streamer(3)
    expected = [ref.step(x)[0] for _ in range(6)]
    with torch.inference_mode():
        st = m.streamer(3)
        got = [st.step(x)[0] for _ in range(3)]
    got += [st.step(x)[0] for _ in range(2)]                         # outside inference mode
    st.reset(cells=[0])
    st.reset()
    with torch.inference_mode():
        got.append(st.step(x)[0])
    for a, b in zip(got, expected[:5] + expected[:1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- spike-capable designs: recurrent backbones, branch routing, direct heads ---------------------------------
SPIKE_DESIGNS = [dict(backbone="lstm", channels=(6,), compressor=(3,)),
                 dict(backbone="elm", channels=(5,), compressor=(3,)),
                 dict(backbone="lstm", channels=(6,), compressor=(3,), n_branches=3, direct_heads=True,
                      local_taus=(2.0, 9.0), imem_tasks=True),
                 dict(backbone="lstm", channels=(6,), compressor=(3,), n_branches=3, direct_heads=True,
                      local_taus=(2.0, 9.0), imem_tasks=True, tower_soft=0, tower_hard=0),   # linear towers
                 dict(backbone="elm", channels=(5,), compressor=(4,), n_branches=2, direct_heads=True,
                      feedback=False, soma_clip_mV=-55.0, local_taus=(3.0,), tower_soft=0, tower_hard=0),
                 dict(backbone="branch_lstm", channels=(6,), compressor=(3,), n_branches=3, branch_units=2,
                      direct_heads=True, feedback=False, local_taus=(2.0,), imem_tasks=True, tower_soft=0,
                      tower_hard=0),
                 dict(backbone="lstm", channels=(6,), compressor=(3,), n_branches=3, direct_heads=True,   # soma net
                      feedback=False, soma_channels=(4,), local_taus=(2.0,), imem_tasks=True, tower_soft=0,
                      tower_hard=0)]


def _spike_model(cls, over):
    torch.manual_seed(3)
    m = cls.from_config("tiny", **over)
    if m.config.direct_heads:        # direct heads start at zero: give them weights so that the test sees them
        torch.nn.init.normal_(m.direct.weight)
    m.set_normalization(torch.linspace(-70, -55, m.n_segments), torch.linspace(1, 6, m.n_segments),
                        imem_mean=torch.zeros(m.n_segments), imem_std=torch.full((m.n_segments,), 0.5))
    return m.eval()


@pytest.mark.parametrize("cls", ARCH_CLASSES)
@pytest.mark.parametrize("over", SPIKE_DESIGNS)
def test_recurrent_designs_stream_equal_to_full_pass(cls, over):
    m = _spike_model(cls, over)
    assert m.receptive_field == -1                                    # recurrent: unbounded memory
    B, T = 3, 70
    x = torch.rand(B, m.n_inputs, T) * 2
    with torch.no_grad():
        full = m(x)
    st = m.streamer(B)
    before = st.state_bytes_per_cell()
    v, s, imem = _stream(st, x)
    assert st.state_bytes_per_cell() == before                        # O(1) state
    torch.testing.assert_close(v, full.v, **TOL)
    torch.testing.assert_close(s, full.spike_logit, **TOL)
    if m.config.imem_tasks:
        torch.testing.assert_close(imem, full.imem, **TOL)
    assert full.v.std() > 0.05 and s.std() > 1e-4                    # outputs vary with the input
    # the recurrence remembers: an input at step 5 still changes the output 25 steps later, never earlier ones
    x2 = x.clone()
    x2[:, :m.n_channels, 5] += 3.0
    with torch.no_grad():
        y2 = m(x2).spike_logit
    assert torch.equal(y2[:, :5], full.spike_logit[:, :5])
    assert (y2[:, 30] - full.spike_logit[:, 30]).abs().max() > 1e-6
    # a reset of one cell equals a fresh streamer for that cell
    st.reset(cells=[2])
    v2, _, _ = _stream(st, x[:, :, :20])
    fresh, _, _ = _stream(m.streamer(1), x[2:3, :, :20])
    torch.testing.assert_close(v2[2:3], fresh, **TOL)


def test_direct_heads_reach_only_soma_and_spike():
    m = _spike_model(MMoE, SPIKE_DESIGNS[2])
    x = torch.rand(2, m.n_inputs, 15)
    with torch.no_grad():
        y = m(x, all_tasks=True)
        m.direct.weight.zero_()
        y0 = m(x, all_tasks=True)
    changed = (y - y0).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [0, m.n_segments]   # soma voltage and spike logit


@pytest.mark.parametrize("cls", ARCH_CLASSES)
def test_soma_backbone_feeds_only_the_direct_heads(cls):
    m = _spike_model(cls, SPIKE_DESIGNS[-1])
    assert m.soma_net is not None and m.direct.in_features == 4 and m.all_backbones()[-1] is m.soma_net
    x = torch.rand(2, m.n_inputs, 15)
    with torch.no_grad():
        y = m(x, all_tasks=True)
        for p in m.soma_net.parameters():
            p.add_(0.5)
        y2 = m(x, all_tasks=True)
    changed = (y - y2).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == [0, m.n_segments]   # soma voltage and spike logit only
    m.train()
    m(x, all_tasks=True)[:, m.n_segments].sum().backward()             # the spike loss trains the soma net
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.soma_net.parameters())
    with pytest.raises(ValueError, match="soma_channels needs direct_heads"):
        cls.from_config("tiny", soma_channels=(4,), direct_heads=False)


def test_a_new_backbone_is_one_class_and_one_registration():
    """Through the declared interface only: a causal moving average with a learned gain."""
    from lfdeep_neuron.surrogate.backbone import BACKBONES, Backbone, register_backbone

    @register_backbone("test_ema")
    class EMA(Backbone):
        def __init__(self, c_in, width, n_groups):
            super().__init__()
            self.c_in, self.c_out, self.n_groups = c_in, width * n_groups, n_groups
            self.proj = torch.nn.Linear(c_in, self.c_out)

        @classmethod
        def from_config(cls, c_in, widths, n_groups, config):
            return cls(c_in, widths[-1], n_groups)

        def forward(self, x):
            a = self.proj(x.transpose(1, 2))                             # [B, T, H]
            d = torch.arange(x.shape[2])[:, None] - torch.arange(x.shape[2])[None, :]   # t - s
            w = torch.where(d >= 0, 0.8 ** d.clamp_min(0).to(x.dtype), torch.zeros((), dtype=x.dtype))
            return torch.tanh(torch.einsum("ts,bsh->bht", w, a))

        def initial_state(self, batch, device=None, dtype=None):
            return (torch.zeros(batch, self.c_out, device=device, dtype=dtype),)

        def step(self, x_t, state):
            acc = 0.8 * state[0] + self.proj(x_t)
            return torch.tanh(acc), (acc,)

    try:
        for cls in ARCH_CLASSES:
            m = _spike_model(cls, dict(backbone="test_ema", channels=(4,), compressor=(2,)))
            assert isinstance(m.backbones()[0], EMA)
            x = torch.rand(2, m.n_inputs, 25)
            with torch.no_grad():
                full = m(x)
            v, s, _ = _stream(m.streamer(2), x)
            torch.testing.assert_close(v, full.v, **TOL)
            torch.testing.assert_close(s, full.spike_logit, **TOL)
    finally:
        BACKBONES.pop("test_ema")
    with pytest.raises(ValueError, match="unknown backbone 'test_ema'; registered: branch_lstm, elm, lstm, tcn"):
        MH.from_config("tiny", backbone="test_ema")


def test_spike_design_streams_in_float64_like_the_engine():
    """The co-simulation engine may step in float64: the recurrent / routed design follows its float32 pass."""
    m = _spike_model(MMoEEx, SPIKE_DESIGNS[3])
    x = torch.rand(2, m.n_inputs, 40)
    with torch.no_grad():
        full = m(x)
    st = m.streamer(2, dtype=torch.float64, output="mV")
    v, s, imem = _stream(st, x.double())
    assert v.dtype == torch.float64 and imem is not None
    torch.testing.assert_close(v, m.to_mV(full.v).double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s, full.spike_logit.double(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("cls", ARCH_CLASSES)
@pytest.mark.parametrize("over", [{"feedback": False, "local_taus": (3.0,)}, {"feedback": True}],
                         ids=["input-only", "voltage-feedback"])
def test_spike_history_streams_the_spikes_it_emits(cls, over):
    """A model with spike history reads, in closed loop, exactly the spikes the streamer decided (upward
    crossings of a per-cell threshold); fed those spikes teacher-forced, the full pass gives the same run."""
    m = _model(cls, spike_history=True, **over)
    assert m.n_inputs == m.n_channels + (m.n_segments if over["feedback"] else 0) + 1
    B, T = 3, 80
    torch.manual_seed(5)
    x_syn = torch.rand(B, m.n_channels, T) * 2
    silent = closed_loop(m, x_syn, output="z", spike_threshold=float("inf"))
    assert not silent.spiked.any()
    thr = torch.quantile(silent.spike_logit, 0.8, dim=1)                  # one threshold per cell
    out = closed_loop(m, x_syn, output="z", spike_threshold=thr)
    above = out.spike_logit > thr[:, None]
    crossing = above & ~torch.cat([torch.zeros(B, 1, dtype=torch.bool), above[:, :-1]], dim=1)
    assert torch.equal(out.spiked, crossing) and out.spiked.sum(dim=1).min() >= 2
    spike_prev = torch.cat([torch.zeros(B, 1), out.spiked[:, :-1].float()], dim=1)
    fb = torch.cat([m.to_z(m.v_rest).expand(B, -1)[:, :, None], out.v[:, :, :-1]], dim=-1)
    with torch.no_grad():
        full = m(m.make_inputs(x_syn, m.to_mV(fb), spike_prev))
    torch.testing.assert_close(out.v, full.v, **TOL)
    torch.testing.assert_close(out.spike_logit, full.spike_logit, **TOL)
    first = int(out.spiked[0].nonzero()[0])                               # the history changes what follows
    assert (out.spike_logit[0, first + 1:] - silent.spike_logit[0, first + 1:]).abs().max() > 1e-4
    torch.testing.assert_close(out.spike_logit[0, :first + 1], silent.spike_logit[0, :first + 1], **TOL)
    # the 'level' rule: a spike in every step above the threshold
    lvl = closed_loop(m, x_syn, output="z", spike_threshold=thr, spike_rule="level")
    assert torch.equal(lvl.spiked, lvl.spike_logit > thr[:, None])
    # teacher-forced steps carry their own spike row; the streamer's decisions are still reported
    st = m.streamer(B, spike_threshold=thr)
    x_tf = m.make_inputs(x_syn, m.to_mV(fb), spike_prev)
    res = [st.step(x_tf[:, :, t]) for t in range(T)]
    torch.testing.assert_close(torch.stack([r.spike_logit for r in res], dim=1), full.spike_logit, **TOL)
    assert torch.equal(torch.stack([r.spiked for r in res], dim=1), out.spiked)
    with pytest.raises(ValueError, match="spike_threshold must be"):
        m.streamer(B, spike_threshold=torch.zeros(B + 1))
    with pytest.raises(ValueError, match="spike history"):
        m.make_inputs(x_syn, m.to_mV(fb))
