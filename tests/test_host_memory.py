"""``fewshot_nsl.host_memory``: a run makes glibc keep freed tensor memory (fewer page faults per step).

The setting is process-wide and cannot be undone, so every check runs in a fresh subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fewshot_nsl.host_memory import ENV_SWITCH, _glibc

glibc_only = pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt is what is set")

#: Prints how many bytes glibc has in mmapped blocks (mallinfo2().hblkhd) around 16 and 64 MiB tensors, after calling
#: retain_freed_memory() when told to, and what it returned.
PROBE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from fewshot_nsl.host_memory import retain_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    state = retain_freed_memory() if sys.argv[1] == "call" else None
    rises = []
    for mib in (16, 64):  # below and above glibc's largest mmap threshold (32 MiB)
        before = libc.mallinfo2().hblkhd
        t = torch.empty(mib << 18)
        t.fill_(1.0)
        rises.append(libc.mallinfo2().hblkhd - before)
        del t
    print(json.dumps({"state": state, "mapped_rise": rises}))
""")


def _probe(call: bool, env_value: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k != ENV_SWITCH}
    if env_value:
        env[ENV_SWITCH] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE, "call" if call else "skip"], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_retained_blocks_come_from_the_heap_not_fresh_mappings():
    """With the setting, 16 and 64 MiB tensors are carved from the heap (kept across frees); without it, glibc maps
    them freshly (and unmaps them when freed, so the next ones fault in every page again)."""
    default = _probe(call=False)
    assert default["mapped_rise"][0] >= 16 << 20 and default["mapped_rise"][1] >= 64 << 20, default
    retained = _probe(call=True)
    assert retained["state"] == "retained"
    assert retained["mapped_rise"] == [0, 0], retained


@glibc_only
def test_environment_switch_leaves_malloc_alone():
    r = _probe(call=True, env_value="default")
    assert r["state"] == f"default ({ENV_SWITCH}=default)"
    assert r["mapped_rise"][1] >= 64 << 20, r


def test_train_record_says_how_host_memory_was_handled(tmp_path):
    """``train.json`` records the setting the run had (evidence beside the row; it changes no number)."""
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.host_memory import retain_freed_memory
    from fewshot_nsl.runner import run, run_dir_of

    cfg = resolve_config({"method": "nearest_neighbor", "profile": "smoke", "dataset": "tiny", "ways": 3, "shots": 1,
                          "image_size": 16, "results_dir": str(tmp_path / "results"),
                          "cache_dir": str(tmp_path / "cache"), "device": "cpu", "eval": {"episodes": 2, "queries": 2},
                          "pretrain": {"max_steps": 2}})
    run(cfg, progress=False, log=lambda *a: None)
    record = json.loads((run_dir_of(cfg) / "train.json").read_text())
    assert record["host_malloc"] == retain_freed_memory()


def test_unknown_switch_value_is_one_clear_error(tmp_path):
    """A mistyped ``FEWSHOT_NSL_MALLOC`` is refused in one line by the command, before any work."""
    env = {**os.environ, ENV_SWITCH: "defualt"}
    out = subprocess.run([sys.executable, "-m", "fewshot_nsl", "--method", "nearest_neighbor", "--profile", "smoke",
                          "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode != 0
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "FEWSHOT_NSL_MALLOC" in err[0] and "'defualt'" in err[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists(), "nothing is written before the refusal"
