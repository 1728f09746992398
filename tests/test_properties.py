"""Properties that must hold for every input: the soft-threshold, and prune/export on random shapes and gates."""

import copy
import tempfile

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import soralib
from soralib.verify import verify_adapter

# float32-representable values, so that the float32 computation can be compared exactly
floats32 = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)
gates = st.lists(floats32, min_size=1, max_size=16).map(lambda xs: torch.tensor(xs, dtype=torch.float32))
taus = st.floats(min_value=0, max_value=1e3, width=32)


# ---- soft-threshold ----------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(g=gates, tau=taus)
def test_soft_threshold_zeroes_small_gates_and_shrinks_the_others_by_tau(g, tau):
    out = soralib.soft_threshold(g, tau)
    small = g.abs() <= tau
    assert (out[small] == 0).all()
    assert torch.equal(out[~small], g[~small] - torch.sign(g[~small]) * tau)


@settings(max_examples=300, deadline=None)
@given(g=gates, tau=taus)
def test_soft_threshold_never_grows_a_gate_nor_flips_its_sign(g, tau):
    out = soralib.soft_threshold(g, tau)
    assert (out.abs() <= g.abs()).all()
    assert (out * g >= 0).all()
    assert torch.equal(torch.sign(out[out != 0]), torch.sign(g[out != 0]))


@settings(max_examples=200, deadline=None)
@given(g=gates, tau=taus)
def test_soft_threshold_is_the_prox_operator_of_tau_times_abs(g, tau):
    """T_τ(g) minimises ½(x − g)² + τ|x| elementwise: no point of a dense grid does better."""
    out, g64 = soralib.soft_threshold(g, tau).double(), g.double()
    span = g64.abs().max().item() + tau + 1
    grid = torch.cat([torch.linspace(-span, span, 4001, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])

    def objective(x):
        return 0.5 * (x - g64[:, None]) ** 2 + tau * x.abs()

    best_on_grid = objective(grid[None, :]).min(dim=1).values
    at_out = objective(out[:, None])[:, 0]
    assert (at_out <= best_on_grid + 1e-6 * (1 + best_on_grid.abs())).all()


@settings(max_examples=200, deadline=None)
@given(g=gates, tau=taus, tau2=taus)
def test_soft_threshold_keeps_zeros_at_zero(g, tau, tau2):
    assert torch.equal(soralib.soft_threshold(torch.zeros_like(g), tau), torch.zeros_like(g))
    once = soralib.soft_threshold(g, tau)
    twice = soralib.soft_threshold(once, tau2)
    assert (twice[once == 0] == 0).all()


@settings(max_examples=200, deadline=None)
@given(g=gates)
def test_soft_threshold_with_tau_zero_is_the_identity(g):
    assert torch.equal(soralib.soft_threshold(g, 0.0), g)


# ---- prune and export on random MLPs -----------------------------------------------------------------------------

@st.composite
def sora_cases(draw):
    """A random plain MLP, SoRA on a random non-empty subset of its linear layers, random gate zero masks.

    Plain nn.Sequential: PEFT targets its linear layers by their indices ("0", "2", "4").
    """
    n_linear = draw(st.integers(2, 3))
    dims = draw(st.lists(st.integers(1, 24), min_size=n_linear + 1, max_size=n_linear + 1))
    linear_names = [str(2 * i) for i in range(n_linear)]  # Sequential indices; a Tanh sits between linear layers
    targets = draw(st.lists(st.sampled_from(linear_names), min_size=1, unique=True))
    r = draw(st.integers(1, 6))
    masks = {name: draw(st.lists(st.booleans(), min_size=r, max_size=r)) for name in targets}
    if draw(st.booleans()):  # often, at least one module pruned to rank 0
        masks[draw(st.sampled_from(targets))] = [False] * r
    return dict(dims=dims, targets=targets, r=r, masks=masks, lora_alpha=draw(st.sampled_from([1.0, 2.5, 8.0])),
                seed=draw(st.integers(0, 2**16)))


def build_mlp(dims, seed):
    torch.manual_seed(seed)
    layers = []
    for n_in, n_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(n_in, n_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).eval()


@torch.no_grad()
def trained(base, case):
    """SoRA around a copy of `base`, with random B and gates zeroed by the case's masks."""
    config = soralib.SoraConfig(r=case["r"], lora_alpha=case["lora_alpha"], target_modules=case["targets"])
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(case["seed"])
    for name, layer in model.named_modules():
        if isinstance(layer, soralib.SoraLayer):
            B = layer.sora_B["default"].weight
            B.copy_(torch.randn(B.shape, generator=g))
            mask = torch.tensor(case["masks"][name.removeprefix("base_model.model.")])
            layer.sora_gate["default"].copy_(torch.randn(case["r"], generator=g) * mask)
    return model.eval()


def run(model, x):
    with torch.no_grad():
        return model(x)


@settings(max_examples=100, deadline=None)
@given(case=sora_cases())
def test_prune_and_both_export_layouts_keep_the_outputs_of_random_mlps(case):
    base = build_mlp(case["dims"], case["seed"])
    x = torch.randn(5, case["dims"][0], generator=torch.Generator().manual_seed(case["seed"]))
    model = trained(base, case)
    expected = run(model, x)

    kept = soralib.prune(model)
    assert kept == {name: sum(mask) for name, mask in case["masks"].items()}
    torch.testing.assert_close(run(model, x), expected, atol=1e-5, rtol=0)

    for layout in ("exact", "uniform"):
        with tempfile.TemporaryDirectory() as tmp:
            if layout == "exact" and not any(kept.values()):
                with pytest.raises(ValueError, match="every gate is zero"):
                    soralib.export_lora(model, tmp, layout=layout)
                continue
            soralib.export_lora(model, tmp, layout=layout)
            verify_adapter(base, tmp)  # the verifier agrees with PEFT on every random shape
            loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
            torch.testing.assert_close(run(loaded, x), expected, atol=1e-5, rtol=0)
