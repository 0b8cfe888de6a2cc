"""train.compile with DDP: the compiled backward pass is split at DDP's buckets so all-reduces overlap it."""

import json
import os
import subprocess
from pathlib import Path

from helpers import TORCHRUN


def test_compiled_backward_is_split_at_buckets_and_all_reduces_overlap_it():
    script = Path(__file__).parent / "compile_overlap.py"
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(script)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    events = json.loads(result.stdout.strip().splitlines()[-1])
    compiled = [i for i, kind in enumerate(events) if kind == "compiled"]
    all_reduces = [i for i, kind in enumerate(events) if kind == "allreduce"]
    assert len(compiled) >= 4, f"the compiled backward was not split at DDP's buckets: {events}"
    assert len(all_reduces) >= 4, events
    # Overlap: buckets are all-reduced while later pieces of the backward pass still have to run.
    assert sum(index < compiled[-1] for index in all_reduces) >= 3, events
