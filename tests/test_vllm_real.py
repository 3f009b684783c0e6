"""eplbd against the real vLLM package (vLLM's CPU build here; ``make test-vllm`` installs it).

The end-to-end test runs a real vLLM ``LLM`` (2 expert-parallel ranks, ``enable_eplb``, redundant
experts, vLLM's own engine, ``EplbState``, V1 model runner, ``FusedMoE`` layers and
``collective_rpc``) on a tiny Qwen3-MoE built here, with eplbd's worker extension and a real
``eplbd serve``. What vLLM's CPU build lacks for EPLB is bridged by the test-only plugin in
``tests/vllm_cpu_shim`` (its docstring lists each patch); nothing else is replaced.

Model Runner V2 is GPU-only (it needs Triton), so its hook is tested against vLLM's real
``EPLBController`` and ``step_eplb_after`` decorator, which V2's ``execute_model`` and
``_dummy_run`` go through; ``test_v2_runner_on_gpu`` is the check a GPU machine runs.
"""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="the vllm extra is not installed (make test-vllm installs it)")

from eplbd.errors import InvalidArgumentError  # noqa: E402
from eplbd.integrations.vllm import (SUPPORTED_VLLM, check_vllm_version, install_step_hook,  # noqa: E402
                                     step_hook_target)
from eplbd.integrations.vllm_demo import VllmDemoConfig, run_child  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


def test_the_shim_is_installed_and_version_guarded():
    names = {ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert "eplbd_cpu_shim" in names, "make test-vllm installs tests/vllm_cpu_shim"
    import eplbd_vllm_cpu_shim as shim

    assert vllm.__version__ in shim.SUPPORTED
    saved = vllm.__version__
    vllm.__version__ = "0.99.0"
    try:
        with pytest.raises(shim.UnsupportedVllmError, match="written for vLLM 0.32.0; found 0.99.0"):
            shim._APPLIED = False
            shim.register()
    finally:
        vllm.__version__ = saved


def test_shim_router_maps_and_counts_like_vllms_kernel():
    """The torch port of vLLM's map-and-record kernel: replicas picked by the token's Knuth hash,
    only unpadded tokens counted, nothing counted while the record flag is off."""
    from eplbd_vllm_cpu_shim import eplb_map_to_physical_and_record as fn

    log2phy = torch.tensor([[0, 3], [1, -1], [2, -1]])
    cnt = torch.tensor([2, 1, 1])
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 0]], dtype=torch.int32)
    load = torch.zeros(4, dtype=torch.int32)
    out = fn(ids, load, log2phy, cnt, torch.tensor(True), torch.tensor(3, dtype=torch.int32))
    expect_replica = [((t * 2654435769) & 0xFFFFFFFF) % 2 for t in range(4)]
    assert out[:, 0][:3].tolist() == [log2phy[0, r].item() for r in expect_replica[:3]]
    assert out.dtype == ids.dtype and out[:, 1].tolist() == [1, 2, 1, 0 if expect_replica[3] == 0 else 3]
    assert int(load.sum()) == 6  # token 3 is padding
    before = load.clone()
    fn(ids, load, log2phy, cnt, torch.tensor(False))
    assert torch.equal(load, before)


@pytest.mark.timeout(600)
def test_vllm_engine_is_balanced_by_eplbd_end_to_end():
    """A real vLLM engine, served greedily while eplbd plans on its schedule and on ``eplbctl rebalance``:
    experts move, outputs and weights stay exact, idle-rank dummy steps are seen, vLLM's own
    (async, its default) balancer never runs, and ``eplbctl balancedness`` shows the engine's layers."""
    cfg = VllmDemoConfig(rounds=5)
    lines: list[str] = []
    s = run_child(cfg, lines.append)
    assert s["engine"] == "vllm" and s["vllm_version"] == vllm.__version__ and s["ep_size"] == 2
    assert s["outputs_identical"], lines
    assert s["weights_verified"], s["verify"]
    assert s["manual_rebalance"]["pushed"], s["manual_rebalance"]  # the operator's eplbctl rebalance
    assert s["plans_committed"] >= 2, lines  # that one and at least one scheduled re-plan
    assert all(v["verified"] and not v["mismatches"] for v in s["verify"])
    assert s["experts_moved"] > 0 and s["bytes_moved"] > 0
    # what the agents changed is what vLLM's own map shows changed, step by step (rank 0's view)
    assert sum(s["slots_changed_per_step"]) == s["experts_moved"]
    assert s["balancedness_after"] > s["balancedness_before"] + 0.15, s
    assert s["idle_steps_seen"] == 3  # execute_dummy_batch (idle DP rank) -> the hook, on every rank
    assert s["vllm_eplb_use_async"] is True  # left at vLLM's default: eplbd keeps vLLM's balancer off anyway
    per_layer = s["daemon_balancedness"]["per_layer_observed"]
    assert len(per_layer) == cfg.layers and all(0 < b <= 1 for b in per_layer)
    # vLLM's balancer would have logged its rearrangements; eplbd's hook replaced its step on all ranks.
    assert any("hooked eplb_step on 2 ranks" in line for line in lines)


def test_builtin_vllm_eplb_also_runs_through_the_shim():
    """The same engine with vLLM's own EPLB (sync): it rearranges and keeps greedy outputs, which is what
    the shim's router and expert-map patches must get right (benchmarks/bench_vllm.py compares the two)."""
    s = run_child(VllmDemoConfig(balancer="vllm", rounds=3), lambda line: None)
    assert s["outputs_identical"]
    assert sum(s["slots_changed_per_step"]) > 0  # vLLM rearranged in the running engine
    assert s["balancedness_after"] > s["balancedness_before"]


# --- Model Runner V2 ------------------------------------------------------------------------------
def _v2_classes():
    from vllm.v1.worker.gpu import model_runner as v2
    from vllm.v1.worker.gpu.eplb_utils import EPLBController, step_eplb_after

    return v2.GPUModelRunner, EPLBController, step_eplb_after


def test_v2_runner_steps_eplb_through_its_controller():
    """What the V2 hook relies on, read from vLLM's real classes: the runner owns an EPLBController as
    ``self.eplb`` and its forward and dummy paths step it through ``step_eplb_after``."""
    runner_cls, _, _ = _v2_classes()
    assert "self.eplb = EPLBController(" in inspect.getsource(runner_cls.__init__)
    for name in ("execute_model", "_dummy_run"):
        assert hasattr(getattr(runner_cls, name), "__wrapped__"), f"V2 {name} is no longer wrapped by step_eplb_after"


def test_v2_hook_replaces_the_controller_step_and_sees_dummy_steps():
    runner_cls, controller_cls, step_eplb_after = _v2_classes()
    from vllm.config import ParallelConfig

    class Runner:  # V2's call pattern, with vLLM's own decorator
        def __init__(self) -> None:
            self.eplb = controller_cls(ParallelConfig(), torch.device("cpu"))

        @step_eplb_after()
        def execute_model(self) -> str:
            return "out"

        @step_eplb_after(is_dummy=True)
        def _dummy_run(self, num_tokens: int, is_profile: bool = False, skip_eplb: bool = False) -> None:
            return None

    runner, calls = Runner(), []
    assert step_hook_target(runner) == "eplb.step"
    assert install_step_hook(runner, lambda is_dummy=False, is_profile=False: calls.append((is_dummy, is_profile))) \
        == "eplb.step"
    assert runner.execute_model() == "out"
    runner._dummy_run(1)
    runner._dummy_run(1, is_profile=True)
    runner._dummy_run(1, skip_eplb=True)
    assert calls == [(False, False), (True, False), (True, True)]


def test_a_runner_with_no_eplb_step_is_refused_by_name():
    class Runner:
        def execute_model(self) -> None: ...

    with pytest.raises(InvalidArgumentError, match="Runner has neither eplb_step .* nor eplb.step"):
        step_hook_target(Runner())


def test_the_installed_vllm_is_in_the_supported_range():
    check_vllm_version(vllm.__version__)
    major, minor = (int(x) for x in vllm.__version__.split(".")[:2])
    assert (major, minor) in SUPPORTED_VLLM


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Model Runner V2 is GPU-only)")
@pytest.mark.timeout(900)
def test_v2_runner_on_gpu(monkeypatch):
    """On a GPU machine with vLLM (not the CPU build): the same end-to-end run on Model Runner V2."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    s = run_child(VllmDemoConfig(rounds=5), lambda line: None)
    assert s["outputs_identical"] and s["weights_verified"] and s["plans_committed"] >= 2
