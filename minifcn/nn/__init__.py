"""Layers and the Module tree that holds a network's parameters.

    import minifcn as mf
    net = mf.nn.Sequential(mf.nn.Conv2d(3, 16, 3, padding=1), mf.nn.ReLU())
    net.state_dict()      # {"0.weight": array (16, 3, 3, 3), "0.bias": array (16,)}

Random draws (initialisers, dropout masks) share one stream:
``mf.nn.manual_seed(0)`` makes a run repeatable; ``get_rng_state`` /
``set_rng_state`` save and restore it.
"""

from minifcn.nn import init
from minifcn.nn.activation import Dropout, Dropout2d, ReLU
from minifcn.nn.container import Identity, Sequential
from minifcn.nn.conv import Conv2d, ConvTranspose2d
from minifcn.nn.init import get_rng_state, manual_seed, set_rng_state
from minifcn.nn.module import LoadResult, Module, Parameter, StateDictError
from minifcn.nn.normalization import BatchNorm2d
from minifcn.nn.pooling import MaxPool2d
from minifcn.nn.sync_normalization import SyncBatchNorm2d, convert_sync_batchnorm, each_rank_alone

__all__ = [
    "init", "Module", "Parameter", "StateDictError", "LoadResult",
    "Conv2d", "ConvTranspose2d", "MaxPool2d", "ReLU", "Dropout", "Dropout2d", "BatchNorm2d",
    "SyncBatchNorm2d", "convert_sync_batchnorm", "each_rank_alone",
    "Sequential", "Identity", "manual_seed", "get_rng_state", "set_rng_state",
]
