"""setup.py: the hot modules it names are installed compiled (mypyc), and the
plugins among them still register their hooks from Python."""

import importlib
import importlib.machinery
import os
import time

import pytest

from tests.compiled import ROOT, compiled_sources, module_of, stale


def test_the_list_names_sources_that_exist():
    sources = compiled_sources()
    assert "plugins/comox_limits/admission.py" in sources
    assert all((ROOT / source).is_file() for source in sources)
    assert module_of("plugins/comox_limits/local.py") == "comox_limits.local"
    assert module_of("comox/usage.py") == "comox.usage"


@pytest.mark.skipif(os.environ.get("COMOX_COMPILE") == "0", reason="installed as pure Python (COMOX_COMPILE=0)")
@pytest.mark.parametrize("source", compiled_sources())
def test_each_module_setup_py_names_is_installed_compiled(source):
    module = importlib.import_module(module_of(source))
    assert isinstance(module.__spec__.loader, importlib.machinery.ExtensionFileLoader), (
        f"{source} runs as pure Python: reinstall (pip install -e .) with a C compiler, or set COMOX_COMPILE=0")


def test_the_compiled_limits_plugin_registers_its_hooks_from_python():
    import comox_limits

    from comox.plugins import make_plugin_manager

    manager = make_plugin_manager()
    for hook in ("comox_admit", "comox_request_done", "comox_plugin_settings"):
        impls = {impl.plugin_name: impl.function for impl in getattr(manager.hook, hook).get_hookimpls()}
        assert impls["limits"] is getattr(comox_limits, hook)


def test_a_source_newer_than_its_build_is_stale(tmp_path, monkeypatch):
    import tests.compiled as compiled

    package = tmp_path / "plugins" / "comox_x"
    package.mkdir(parents=True)
    (package / "fast.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / "comox").mkdir()
    monkeypatch.setattr(compiled, "ROOT", tmp_path)
    source = package / "fast.py"
    source.write_text("")
    built = package / "fast.cpython-311-x86_64-linux-gnu.so"
    os.utime(built, (time.time() - 10, time.time() - 10))
    assert compiled.stale() == ["plugins/comox_x/fast.py"]
    os.utime(built, (time.time() + 10, time.time() + 10))
    assert compiled.stale() == []
