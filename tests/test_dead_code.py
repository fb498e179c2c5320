"""Generation-time dead-code elimination (pipeline.dead_code): drops what nothing reachable names,
keeps whatever Python or a library could still call.

    .venv/bin/python -m pytest -q tests/test_dead_code.py
"""

from __future__ import annotations

import textwrap

from pipeline.dead_code import prune

LIB = textwrap.dedent('''
    import torch

    from pkg.registry import register


    def used():
        return helper()


    def helper():
        return 1


    def unused():
        return used()


    def _recursive_but_unused():
        return _recursive_but_unused()


    @register("mlp", "relu2")
    def registered_part():
        return 2


    def by_string_name():
        return 3


    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()

        def forward(self, x):
            return x

        def called(self):
            return 4

        def never_called(self):
            return 5

        @property
        def unused_property(self):
            return 6


    class Orphan:
        def called(self):
            return 7
''')

MAIN = textwrap.dedent('''
    import lib

    DISPATCH = {"x": "by_string_name"}


    def main():
        net = lib.Net()
        return lib.used() + net.called()
''')


def _pruned():
    return prune({"lib.py": LIB, "main.py": MAIN}, extra_roots="from main import main")


def test_unreferenced_definitions_go_and_referenced_ones_stay():
    out = _pruned()
    lib = out["lib.py"]
    for kept in ("def used", "def helper", "class Net", "def called", "def __init__", "def forward",
                 '@register("mlp", "relu2")', "def registered_part", "def by_string_name"):
        assert kept in lib, kept
    for gone in ("def unused(", "def _recursive_but_unused", "def never_called", "def unused_property",
                 "class Orphan"):
        assert gone not in lib, gone
    assert "def main" in out["main.py"]
    compile(lib, "lib.py", "exec")


def test_without_a_root_the_entry_point_goes_but_module_level_code_stays():
    out = prune({"main.py": MAIN})
    assert "def main" not in out["main.py"] and 'DISPATCH = {"x": "by_string_name"}' in out["main.py"]


def test_a_class_left_without_methods_stays_valid():
    src = "class A:\n    def gone(self):\n        return 1\n\n\nx = A()\n"
    out = prune({"m.py": src})["m.py"]
    assert "gone" not in out
    ns: dict = {}
    exec(compile(out, "m.py", "exec"), ns)
    assert type(ns["x"]).__name__ == "A"


def test_prose_in_strings_does_not_keep_a_function_but_a_bare_name_does():
    src = ('def train_tokenizer():\n    pass\n\n\ndef kept():\n    pass\n\n\n'
           'MSG = "run train_tokenizer first"\nNAME = "kept"\n')
    out = prune({"m.py": src})["m.py"]
    assert "def train_tokenizer" not in out and "def kept" in out
