"""uvicorn under `python -m kbloop`: its --loop auto (the default) runs on kbloop.

uvicorn's "auto" loop picks uvloop whenever uvloop is importable, and makes the loop itself
(uvicorn 0.36 and newer: a loop factory; older ones: an event loop policy), so the policy that
`python -m kbloop` sets would be bypassed silently.  When uvicorn.config is imported, its
"auto" entry is pointed at kbloop instead; an explicit --loop (asyncio, uvloop, a factory) is
left as the user gave it.  Without python -m kbloop: `uvicorn --loop kbloop:new_event_loop`
(uvicorn 0.36 or newer).
"""
import importlib.abc
import importlib.machinery
import sys


def auto_loop_factory(use_subprocess=False):
    """uvicorn >= 0.36: LOOP_FACTORIES["auto"] under python -m kbloop."""
    import kbloop
    return kbloop.new_event_loop


def auto_loop_setup(use_subprocess=False):
    """uvicorn < 0.36: LOOP_SETUPS["auto"] under python -m kbloop."""
    import asyncio

    import kbloop
    asyncio.set_event_loop_policy(kbloop.EventLoopPolicy())


def _patch(config):
    if isinstance(getattr(config, 'LOOP_FACTORIES', None), dict):
        config.LOOP_FACTORIES['auto'] = 'kbloop._uvicorn:auto_loop_factory'
    elif isinstance(getattr(config, 'LOOP_SETUPS', None), dict):
        config.LOOP_SETUPS['auto'] = 'kbloop._uvicorn:auto_loop_setup'


class _ConfigFinder(importlib.abc.MetaPathFinder):
    """Finds uvicorn.config as the path finder does, and patches it once it has run."""

    def find_spec(self, name, path, target=None):
        if name != 'uvicorn.config':
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def hook_uvicorn():
    """Make uvicorn's --loop auto mean kbloop in this process, whenever uvicorn is imported."""
    if 'uvicorn.config' in sys.modules:
        _patch(sys.modules['uvicorn.config'])
    elif not any(isinstance(f, _ConfigFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ConfigFinder())
