"""Every knob of the fast CPU backend, in one place (bench/RESULTS.md has the measurements).

The code reads them as ``tuning.NAME`` at call time, so a test can set one
(monkeypatch) to force a path: blocks of one row, threads on tiny work.
"""

# ---- convolution: im2col in cache-sized blocks (conv_blocks.py) ----
BLOCK_BYTES = 1536 << 10       # one block of cols: three quarters of a 2 MiB L2 cache, ...
MIN_BLOCK_COLUMNS = 1024       # ... but wide enough that summing the weight gradient's blocks is cheap
MAX_BLOCK_COLUMNS = 16384      # ... and for thin layers (conv1_1: K = 27) not past the L2 either
PRODUCT_MACS = 1 << 20         # thin products are cut into runs of about this many multiply-adds, ...
MIN_PRODUCT_COLUMNS = 384      # ... when such a run is this wide: OpenBLAS then skips packing them
THIN_GRADIENT_CHANNELS = 128   # weight gradients with at most this many rows are computed transposed

# ---- convolution: sharing the work among threads (conv_products.py, conv.py) ----
MIN_CHANNELS_PER_THREAD = 16   # threads share output channels only if each gets at least this many
MAX_PARTIAL_BYTES = 16 << 20   # a larger weight gradient is split by channels, not summed per thread
MIN_FLOPS_PER_THREAD = 35e6    # below this much work a thread costs more than it saves

# ---- convolution: outputs that read only padding (reference/windows.py) ----
MAX_REACHED_FRACTION = 0.75    # when fewer outputs than this reach the input, compute them alone

# ---- passes over memory (threads.shares) ----
MIN_SHARED_BYTES = 16 << 20    # a smaller pass runs in the calling thread: a hand-off costs more
POOL_PASSES = 6                # reads and writes of an x-sized array in a tiled pool, roughly
BATCH_NORM_PASSES = 3          # ... in one per-channel map of BatchNorm
