"""The parts of the training run, one job a module; ``minifcn.train.Trainer`` puts them
together (its docstring lists them). This file imports nothing: import from the modules."""
