"""train.keep_host_memory: a training step's freed host memory stays in the process for the next step."""

import subprocess
import sys

# A real CPU training loop (LeNet, DataLoader, SGD), run in its own process so this one's allocator is untouched:
# minor page faults per step before, then after keep_freed_memory().
LOOP = """
import resource, torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from launcher.engine.host_memory import keep_freed_memory
from launcher.recipes.lenet import build_model

torch.manual_seed(0)
model = build_model(None)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = TensorDataset(torch.rand(8192, 1, 28, 28), torch.randint(0, 10, (8192,)))

def faults_per_step(steps=20):
    batches = iter(DataLoader(data, batch_size=256, shuffle=True))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _, (images, labels) in zip(range(steps), batches):
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

faults_per_step(5)
default = faults_per_step()
kept = keep_freed_memory()
faults_per_step(5)
print(default, kept, faults_per_step())
"""


def test_keeping_freed_memory_ends_the_page_faults_of_every_step():
    # glibc's mmap threshold adapts as a process runs, so with its defaults the same loop faults 15 times per step
    # in one process and 4,600 in the next. Its starting threshold (128 KB), pinned, is the faulting state every
    # time: each step's activations mmapped, handed back to the OS when freed, and faulted in again.
    result = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert result.returncode == 0, result.stderr
    before, kept, after = result.stdout.split()
    assert kept == "True"
    assert float(before) > 1000 and float(after) < float(before) / 20, result.stdout
