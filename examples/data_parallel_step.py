"""One data-parallel training step, written out (docs/appendix_c_data_parallel.md walks through it).

    python examples/data_parallel_step.py               # one process: the whole batch
    mpiexec -n 2 python examples/data_parallel_step.py  # two: each trains on half of it

Every rank builds the same model from the same seed and draws the same global batch; each
trains on its own share of the batch, and the ranks add up what they computed. Rank 0 prints
the batch's loss and gradient, which are the same, up to rounding, for any number of ranks.
"""

import numpy as np

import minifcn as mf
from minifcn import distributed, nn
from minifcn import functional as F
from minifcn.train import TrainConfig, build_model

group = distributed.world()  # the processes mpiexec started (or this one alone)

nn.manual_seed(0)  # the same initial weights on every rank
model = build_model(TrainConfig(width=1 / 16, fc_channels=16), num_classes=5).to(dtype=np.float64)
for param in model.parameters():
    nn.init.normal_(param, 0.0, 0.3)
nn.convert_sync_batchnorm(model, group)  # BatchNorm with the statistics of the global batch

rng = np.random.default_rng(0)  # the same global batch on every rank...
images = rng.standard_normal((4, 3, 32, 32))
labels = rng.integers(0, 5, (4, 32, 32))
labels[3, :20] = 255  # (mostly unlabelled: the shares' pixel counts differ)
start, stop = distributed.batch_share(len(images), group.rank, group.size)  # ...of which this share

# forward and backward of this share: its pixel losses summed, not averaged
loss = F.softmax_cross_entropy(model(mf.Tensor(images[start:stop])), labels[start:stop], reduction="sum")
loss.backward()

# one sum over the ranks: every gradient, the summed loss and the labelled pixels, in one buffer
flat = np.concatenate([p.grad.ravel() for p in model.parameters()]
                      + [[loss.item(), np.count_nonzero(labels[start:stop] != 255)]])
group.all_sum(flat)
labelled = flat[-1]
batch_loss, gradient = flat[-2] / labelled, flat[:-2] / labelled  # the batch's mean, and its gradient

if group.is_root:
    shares = [distributed.batch_share(len(images), rank, group.size) for rank in range(group.size)]
    print(f"{group.size} rank(s), images per rank: {[b - a for a, b in shares]}")
    print(f"loss of the batch {batch_loss:.10f}, gradient norm {np.linalg.norm(gradient):.10f}")
