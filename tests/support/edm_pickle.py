"""Write network snapshots in EDM's exact persistence format, for loader tests, without EDM's code.

EDM's ``torch_utils.persistence`` pickles every decorated module as ``_reconstruct_persistent_obj(meta)``
with ``meta = dict(type='class', version=6, module_src=..., class_name=..., state=obj.__dict__)``, where
the state carries ``_init_args`` / ``_init_kwargs``; torch containers (``ModuleDict``) pickle the ordinary
way (``copyreg.__newobj__`` + state). Here ``module_src`` is code that fails loudly if anyone runs it.
"""

import contextlib
import copyreg
import pickle
import sys
import types

import torch

MODULE_SRC_THAT_MUST_NOT_RUN = (
    "raise SystemExit('SECURITY: the module_src embedded in an EDM snapshot was executed')\n"
    "import os; os.system('echo pwned')\n"
)


def _must_not_be_called(meta):
    raise AssertionError("EDM's _reconstruct_persistent_obj was called while loading")


@contextlib.contextmanager
def fake_torch_utils():
    """Make ``torch_utils.persistence._reconstruct_persistent_obj`` importable so pickle can name it."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    _must_not_be_called.__module__, _must_not_be_called.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    _must_not_be_called.__name__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _must_not_be_called
    package.persistence = module
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": module})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _Persistent:
    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return (_must_not_be_called, (self.meta,))


class _Container:
    def __init__(self, cls, state):
        self.cls, self.state = cls, state

    @property
    def __class__(self):  # pickle checks that __newobj__'s class is the object's class
        return self.cls

    def __reduce__(self):
        return (copyreg.__newobj__, (self.cls,), self.state)


def as_edm_record(module: torch.nn.Module, edm_class_names, init_kwargs_of, class_name=None):
    """Mirror ``module`` as EDM would pickle it. ``init_kwargs_of(module)`` gives the constructor kwargs."""
    state = dict(module.__dict__)
    state["_modules"] = {
        name: None if child is None else as_edm_record(child, edm_class_names, init_kwargs_of)
        for name, child in module._modules.items()
    }
    name = class_name or type(module).__name__
    if isinstance(module, (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Sequential)):
        return _Container(type(module), state)
    if name not in edm_class_names:
        raise ValueError(f"{name} is not an EDM persistent class")
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(init_kwargs_of(module))
    state = {k: v for k, v in state.items() if not callable(v) or isinstance(v, torch.Tensor)}
    return _Persistent(dict(type="class", version=6, module_src=MODULE_SRC_THAT_MUST_NOT_RUN, class_name=name, state=state))


def write_edm_snapshot(path, net, edm_class_names, init_kwargs_of, extra=None):
    data = dict(ema=as_edm_record(net, edm_class_names, init_kwargs_of), loss_fn=None, augment_pipe=None)
    data.update(extra or {})
    with fake_torch_utils(), open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path


# --- hand-made records, for tests of what a crafted (malicious or damaged) snapshot may contain ------------


def persistent(class_name, init_kwargs=None, parameters=None, buffers=None, modules=None, **state):
    """One EDM persistent record with exactly the given state (nothing derived from a real module)."""
    full = dict(_parameters=parameters if parameters is not None else {}, _buffers=buffers if buffers is not None else {},
                _modules=modules if modules is not None else {}, training=False, _init_args=(),
                _init_kwargs=init_kwargs if init_kwargs is not None else {})
    full.update(state)
    return _Persistent(dict(type="class", version=6, module_src=MODULE_SRC_THAT_MUST_NOT_RUN, class_name=class_name, state=full))


def container(modules):
    """A ``torch.nn.ModuleDict`` record holding ``modules`` (a dict that may be filled in after this call)."""
    return _Container(torch.nn.ModuleDict, dict(_parameters={}, _buffers={}, _modules=modules, training=False))


def write_records(path, data):
    """Pickle ``data`` (a dict such as ``{"ema": persistent(...)}``, or anything else) as EDM would."""
    with fake_torch_utils(), open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path
