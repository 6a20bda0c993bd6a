"""Part 5 of the GPU suite (the targets, met or missed) and the text of part 3 (the engine run)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from _common import markdown_table
from _gpu_common import PartResult, Settings, device_name, fmt
from _gpu_throughput import LABELS, ThroughputState, mfu, speedup
from _speed_kernels import auto_choice

TARGET_DEVICES = r"H100|H200"
MFU_GOAL = 0.40  # naive ViT-B/16 bf16 training with torch.compile
MFU_GAP = 0.05  # InTI's MFU at most this far below naive's
THROUGHPUT_SLACK = 0.05  # InTI/naive clips/s >= naive/InTI GFLOPs - this


@dataclass
class Target:
    goal: str
    status: str  # MET, MISSED, NOT MEASURED, not applicable (smoke)
    detail: str


def judge(s: Settings, goal: str, ok: bool | None, detail: str) -> Target:
    if ok is None:
        return Target(goal, "NOT MEASURED", detail)
    if s.smoke:
        return Target(goal, "not applicable (smoke)", "measured on the CPU smoke run: " + detail)
    return Target(goal, "MET" if ok else "MISSED", detail)


def throughput_targets(s: Settings, state: ThroughputState) -> list[Target]:
    """InTI's clips/s against the speed-up its GFLOPs promise, per mode, eager and compiled."""
    out = []
    names = {v.name for v in state.variants}
    for mode in ("training", "inference"):
        for compiled in (False, True):
            how = "torch.compile" if compiled else "eager"
            goal = (f"InTI {list(s.layers)} {mode} clips/s >= (naive/InTI GFLOPs - {THROUGHPUT_SLACK}) x naive's "
                    f"({how})")
            if not {"naive", "inti"} <= names:
                out.append(judge(s, goal, None, "part 1 has no GFLOPs"))
                continue
            need = state.gflops("naive") / state.gflops("inti") - THROUGHPUT_SLACK
            m = state.find("inti", mode, compiled)
            sp = speedup(state, m) if m else None
            detail = (f"InTI/naive clips/s {fmt(sp, '.3f')} vs needed {need:.3f} (GFLOPs ratio "
                      f"{state.gflops('inti') / state.gflops('naive'):.3f})")
            out.append(judge(s, goal, None if sp is None else sp >= need, detail))
    return out


def mfu_targets(s: Settings, state: ThroughputState) -> list[Target]:
    """Naive's compiled training MFU, and InTI's next to it."""
    naive, inti = state.find("naive", "training", True), state.find("inti", "training", True)
    n = mfu(s, state, naive)[1] if naive else None
    i = mfu(s, state, inti)[1] if inti else None
    why = "" if s.peak_tflops else " (unknown peak: pass --peak-tflops)"
    goal1 = f"naive ViT-B/16 bf16 training MFU >= {100 * MFU_GOAL:.0f}% with torch.compile"
    out = [judge(s, goal1, None if n is None else n >= MFU_GOAL, f"MFU {fmt(100 * n if n else None)}%{why}")]
    goal2 = f"InTI training MFU within {100 * MFU_GAP:.0f} points of naive's (torch.compile)"
    ok = None if n is None or i is None else i >= n - MFU_GAP
    out.append(judge(s, goal2, ok, f"InTI {fmt(100 * i if i else None)}% vs naive {fmt(100 * n if n else None)}%"
                     + why))
    return out


def engine_targets(s: Settings, engine: PartResult | None) -> list[Target]:
    """The engine run's loss falls; the resume reproduces step and loss."""
    e = engine.data if engine else {}
    steps = e.get("steps", s.engine["clips"] // s.engine["batch"] * s.engine["epochs"])
    fell = e.get("loss_fell")
    out = [judge(s, f"engine run ({steps} steps): the loss falls", fell,
                 f"{fmt(e.get('loss_first'), '.4f')} -> {fmt(e.get('loss_last'), '.4f')}" if fell is not None
                 else (engine.reason if engine else "not run"))]
    step_ok, loss_ok = e.get("step_reproduced"), e.get("loss_reproduced")
    out.append(judge(s, "engine: resume reproduces the step", step_ok,
                     f"first resumed step {e.get('resumed_first_step')}, final {e.get('resumed_final_step')}"))
    out.append(judge(s, "engine: resume reproduces the loss", loss_ok,
                     f"max |difference| {fmt(e.get('loss_max_diff'), '.2e')} (tolerance {e.get('loss_tol')})"))
    return out


def evaluate_targets(s: Settings, state: ThroughputState, engine: PartResult | None) -> list[Target]:
    return throughput_targets(s, state) + mfu_targets(s, state) + engine_targets(s, engine)


def targets_body(s: Settings, targets: list[Target]) -> str:
    """Part 5: a head line (device, counts) and the table."""
    table = markdown_table(["target", "status", "detail"], [[t.goal, t.status, t.detail] for t in targets], "lll")
    if s.smoke:
        head = ("CPU smoke run: the targets are for an H100/H200 and are **not applicable**; the details show that "
                "every figure they need was produced.")
    elif not re.search(TARGET_DEVICES, device_name(s.device).upper()):
        head = f"The targets are set for an H100/H200; this run is on {device_name(s.device)}."
    else:
        head = f"Targets for {device_name(s.device)}."
    counts = {k: sum(t.status == k for t in targets) for k in ("MET", "MISSED", "NOT MEASURED")}
    return head + " " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items()) + ".\n\n" + table


# -- part 3 text ----------------------------------------------------------------------------------
def yes(flag: Any) -> str:
    return {True: "yes", False: "NO"}.get(flag, "not measured")


def engine_body(s: Settings, data: dict[str, Any], sm: dict[str, Any]) -> str:
    """Markdown for part 3 from the worker's JSON and :func:`_gpu_engine.summarise`."""
    ref, e = data.get("reference"), s.engine
    if not ref:
        return "No engine run finished."
    step_ms = fmt(1e3 * sm["step_s"] if sm.get("step_s") else None, ".1f")
    lines = [
        f"- launch: `torchrun --nproc_per_node 1` (world size {ref['world_size']}), backend {ref['backend']}, "
        f"device {ref['device']}, DeepSpeed ZeRO stage {ref['zero_stage']} ({ref['optimizer']}), "
        f"bf16 {'on' if ref['bf16'] else 'off'}",
        f"- run: `recipes/digits_cpu.yaml` on the built-in moving digits ({e['clips']} training clips generated in "
        f"the work directory), {ref['steps_per_epoch']} steps per epoch x {e['epochs']} epochs = {ref['final_step']} "
        f"steps of {ref['global_batch']} clips, lr {e['lr']}; checkpoints {', '.join(ref['checkpoints'])}",
        f"- time: before go, overlapped with part 1: imports and data set generation "
        f"{fmt(data.get('prewarm_s'), '.1f')} s; after go: setup (process group, loaders, model, DeepSpeed "
        f"initialisation) {ref['setup_s']:.1f} s; training "
        f"{ref['fit_s']:.1f} s including checkpoint saves and the adapter export; step time {step_ms} ms (median "
        f"after the first step) = {fmt(sm.get('clips_per_s'), '.1f')} clips/s (the recipe's model is tiny: this "
        "is the engine's and the loader's own cost per step, not a model throughput)",
        f"- **Loss fell: {yes(sm.get('loss_fell'))}** (mean of the first {sm.get('loss_window')} steps "
        f"{fmt(sm.get('loss_first'), '.4f')} -> last {sm.get('loss_window')} steps {fmt(sm.get('loss_last'), '.4f')})",
    ]
    res = data.get("resume")
    if res:
        lines += [
            f"- resumed from `{data['resume_from']}` into a new output directory by a second Trainer: **resume "
            f"reproduced the step: {yes(sm.get('step_reproduced'))}** (first step after resuming "
            f"{sm.get('resumed_first_step')}, expected {data['save_at'] + 1}; final step {sm.get('resumed_final_step')}, "
            f"reference {ref['final_step']})",
            f"- **resume reproduced the loss: {yes(sm.get('loss_reproduced'))}** (max |loss difference| over the "
            f"resumed steps {fmt(sm.get('loss_max_diff'), '.2e')}, tolerance {sm.get('loss_tol')}; at the first "
            f"resumed step {fmt(sm.get('loss_first_diff'), '.2e')})",
        ]
    else:
        lines.append("- resume: **not run** (the worker stopped before it)")
    losses = " ".join(f"{v:.3f}" for _, v in ref["history"])
    lines.append(f"- reference losses by step: {losses}")
    if res:
        lines.append("- resumed run's losses: " + " ".join(f"{st}: {v:.3f}" for st, v in res["history"]))
    return "\n".join(lines)


def kernel_verdict(s: Settings, state: ThroughputState) -> str:
    """Which InTI kernel ``kernel="auto"`` should pick on this device, eager and compiled: the 'InTI' rows
    (what auto runs) against the 'InTI, fused CPU kernel' rows, training and inference. The fused kernel
    should be picked where it is more than 2% faster in both modes."""
    lines, auto = [], auto_choice(s.device)
    for compiled in (False, True):
        runs = auto["compiled" if compiled else "eager"]
        found, ratios = [], []
        for mode in ("training", "inference"):
            default, fused = state.find("inti", mode, compiled), state.find("inti_fused", mode, compiled)
            if not (default and fused and default.clips_per_s and fused.clips_per_s):
                found.append(f"{mode}: not measured")
            elif runs == "fused":
                found.append(f"{mode}: both rows run the fused kernel")
            else:
                ratios.append(fused.clips_per_s / default.clips_per_s)
                found.append(f"{mode}: fused / reference clips/s = {ratios[-1]:.3f}")
        pick = runs if len(ratios) < 2 else ("fused" if min(ratios) > 1.02 else "reference")
        verdict = "keep it" if pick == runs else f"switch it to {pick} in InTILayer.uses_fused_kernel"
        lines.append(f"- {'torch.compile' if compiled else 'eager'}: `auto` runs **{runs}** here; {'; '.join(found)}. "
                     f"Should pick: **{pick}** ({verdict if len(ratios) == 2 else 'not measured against each other'}).")
    return f"InTI kernels ('{LABELS['inti']}' rows = `kernel=\"auto\"`):\n\n" + "\n".join(lines)
