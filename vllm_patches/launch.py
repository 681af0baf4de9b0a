"""Environment and flags for a vLLM replica that runs vllm_patches (tests, benchmarks, demos).

    env = plugin_env(work_dir, max_wait_s=10)     # merge into the replica's environment
    args = plugin_args()                          # append to the vLLM command line

The entry points (``vllm.general_plugins`` / ``vllm.endpoint_plugins``, both named ``preble``) normally come
from installing this project (``pip install -e .``). While they are not installed, ``plugin_env`` writes a
throwaway ``*.dist-info`` that declares them into ``work_dir`` and puts it on ``PYTHONPATH``, so vLLM's
entry-point discovery finds the same functions; the checkout itself goes on ``PYTHONPATH`` too, so
``--scheduler-cls vllm_patches.scheduler.PrebleScheduler`` imports in EngineCore.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from vllm_patches.plugin import PLUGIN_NAME

ROOT = Path(__file__).resolve().parent.parent

ENTRY_POINTS = (
    f"[vllm.general_plugins]\n{PLUGIN_NAME} = vllm_patches.plugin:register\n\n"
    f"[vllm.endpoint_plugins]\n{PLUGIN_NAME} = vllm_patches.plugin:endpoint_plugin\n"
)


def entry_points_installed() -> bool:
    return any(ep.name == PLUGIN_NAME for ep in importlib.metadata.entry_points(group="vllm.endpoint_plugins"))


def plugin_env(work_dir: str | os.PathLike, *, max_wait_s: float | None = None,
               log_admissions: bool = False) -> dict[str, str]:
    paths = [str(ROOT)]
    if not entry_points_installed():
        dist = Path(work_dir) / "preble_vllm_patches_shim" / "preble_vllm_patches_shim-0.0.0.dist-info"
        dist.mkdir(parents=True, exist_ok=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: preble-vllm-patches-shim\nVersion: 0.0.0\n")
        (dist / "entry_points.txt").write_text(ENTRY_POINTS)
        paths.insert(0, str(dist.parent))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    allowed = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p and p != PLUGIN_NAME]
    env = {"VLLM_PLUGINS": ",".join([*allowed, PLUGIN_NAME]), "PYTHONPATH": os.pathsep.join(paths)}
    if max_wait_s is not None:
        env["PREBLE_MAX_WAIT_S"] = str(max_wait_s)
    if log_admissions:
        env["PREBLE_LOG_ADMISSIONS"] = "1"
    return env


def plugin_args(*, asynchronous: bool = False) -> list[str]:
    cls = "PrebleAsyncScheduler" if asynchronous else "PrebleScheduler"
    return ["--scheduler-cls", f"vllm_patches.scheduler.{cls}", "--enable-per-request-metrics"]
