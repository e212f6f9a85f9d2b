"""train.py re-executes itself once with glibc malloc settings that keep XLA's buffers mapped."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from retinaface_jax.malloc_tuning import HUGE_PAGES_ENV, OPT_OUT, TUNED_ENV, tuned_environment

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

ALL = {**TUNED_ENV, **HUGE_PAGES_ENV}


def run(extra_env: dict[str, str], huge_pages: bool = False) -> tuple[int, dict]:
    script = (
        "import os, json, sys\n"
        "from retinaface_jax.malloc_tuning import reexec_with_tuned_malloc\n"
        "print('start', flush=True)\n"
        f"reexec_with_tuned_malloc(huge_pages={huge_pages})\n"
        f"print(json.dumps({{k: os.environ.get(k) for k in {sorted(ALL)!r}}}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ALL and k != OPT_OUT}
    env.pop("RETINAFACE_MALLOC_TUNED", None)
    env.update(extra_env)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return out.count("start"), json.loads(out[-1])


def test_reexecutes_once_with_tuned_env():
    starts, seen = run({})
    assert starts == 2  # the original process and its one replacement
    assert seen == {**TUNED_ENV, "GLIBC_TUNABLES": None}  # no huge pages unless asked for


def test_training_gets_huge_pages():
    starts, seen = run({}, huge_pages=True)
    assert starts == 2
    assert seen == ALL


def test_user_values_are_kept():
    starts, seen = run({"MALLOC_ARENA_MAX": "4"})
    assert starts == 2
    assert seen["MALLOC_ARENA_MAX"] == "4"
    assert seen["MALLOC_MMAP_THRESHOLD_"] == TUNED_ENV["MALLOC_MMAP_THRESHOLD_"]


def test_opt_out_and_already_tuned_do_nothing():
    assert run({OPT_OUT: "1"}, huge_pages=True) == (1, dict.fromkeys(ALL))
    assert run(dict(ALL), huge_pages=True) == (1, ALL)
    assert run(dict(TUNED_ENV)) == (1, {**TUNED_ENV, "GLIBC_TUNABLES": None})


def test_glibc_tunables_get_huge_pages_appended_unless_named():
    starts, seen = run({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, huge_pages=True)
    assert starts == 2
    assert seen["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
    own = {**TUNED_ENV, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=0"}
    assert run(own, huge_pages=True) == (1, own)  # the user's hugetlb=0 is kept: no re-execution


def test_tuned_environment_keeps_other_variables():
    env = {"PATH": "/bin", "MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": ""}
    assert tuned_environment(env, huge_pages=True) == {
        **ALL,
        "PATH": "/bin",
        "MALLOC_ARENA_MAX": "2",
    }
    assert tuned_environment(env) == {**TUNED_ENV, **env}
