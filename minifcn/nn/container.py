"""Containers: Sequential (layers applied in order) and Identity."""

from minifcn.nn.module import Module


class Sequential(Module):
    """``Sequential(a, b, c)(x) == c(b(a(x)))``; the layers are named "0", "1", "2"."""

    def __init__(self, *layers):
        super().__init__()
        for index, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Modules, got {type(layer).__name__} at position {index}")
            self._register(str(index), layer, "module")

    def __len__(self):
        return len(self._members)

    def __iter__(self):
        return iter(self._members.values())

    def __getitem__(self, index):
        layers = list(self._members.values())
        if isinstance(index, slice):
            return Sequential(*layers[index])
        if not -len(layers) <= index < len(layers):
            raise IndexError(f"index {index} out of range for a Sequential of {len(layers)} layers")
        return layers[index]

    def forward(self, x):
        for layer in self._members.values():
            x = layer(x)
        return x


class Identity(Module):
    """y = x (a placeholder where a layer is optional)."""

    def forward(self, x):
        return x
