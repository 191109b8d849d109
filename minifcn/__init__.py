"""minifcn: fully convolutional networks for semantic segmentation, from scratch
on NumPy (CPU) and CuPy (GPU)."""

from minifcn.tensor import Tensor
from minifcn.autograd import no_grad, is_grad_enabled, detect_anomaly, NonFiniteError
from minifcn.gradcheck import gradcheck, GradcheckError
from minifcn import backend, distributed, functional, nn, optim, models
from minifcn.backend import get_backend, set_backend
from minifcn.backend.cpu.threads import get_num_threads, set_num_threads
from minifcn.checkpoint import save_checkpoint, load_checkpoint, save_weights, load_weights

__version__ = "0.1.0"
