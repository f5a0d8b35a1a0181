"""install.py's decisions, in-process: where it installs, what it installs, and that a re-run does nothing."""
from __future__ import annotations

import subprocess
import sys

import pytest
from zimage_testing.helpers import REPO_ROOT


def test_one_rule_finds_comfyui_for_install_and_client(install, tmp_path, monkeypatch):
    from zimage_client.runtime import comfyui_dir, existing_comfyui

    assert install.existing_comfyui is existing_comfyui
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("ZIMAGE_COMFYUI_DIR", raising=False)
    comfy = tmp_path / "ComfyUI"
    plugin = comfy / "custom_nodes" / "comfyui-zimage"
    plugin.mkdir(parents=True)
    (comfy / "main.py").write_text("")
    assert existing_comfyui(plugin) == comfy == comfyui_dir(plugin)
    bare = tmp_path / "elsewhere" / "comfyui-zimage"
    assert existing_comfyui(bare) is None
    assert comfyui_dir(bare) == bare / ".comfyui"  # the runtime install.py provisions
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))
    assert existing_comfyui(bare) == comfy == comfyui_dir(bare)
    monkeypatch.setenv("ZIMAGE_COMFYUI_DIR", str(tmp_path / "provisioned"))  # install.py's choice for its children
    assert comfyui_dir(bare) == tmp_path / "provisioned" and existing_comfyui(bare) == comfy


def test_inside_comfyui_only_the_plugin_requirements_are_installed(install, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    assert install.main([]) == 0
    assert len(calls) == 1 and calls[0][-2:] == ["-r", str(install.PLUGIN_REQUIREMENTS)]


def test_comfy_requirements_skip_torch_and_audio_and_add_requests(install, tmp_path):
    (tmp_path / "requirements.txt").write_text("torch\ntorchvision\ntorchaudio\nnumpy>=1.25.0\n#x\nkornia>=0.7.1\n")
    assert install.comfy_requirements(tmp_path) == ["numpy>=1.25.0", "kornia>=0.7.1", "requests"]


def test_a_provisioned_runtime_is_not_provisioned_again(install, monkeypatch):
    if not (install.STAMP.is_file() and install.venv_python().exists()):
        pytest.skip("runs inside an existing ComfyUI, not the provisioned runtime")
    if install.STAMP.read_text() != install.provision_fingerprint():
        pytest.skip("the runtime predates the current requirements")

    def refuse(*args, **kwargs):
        raise AssertionError("a re-run must not install anything")

    monkeypatch.setattr(subprocess, "run", refuse)
    install.provision_bare()  # returns without touching pip


def test_browser_tools_are_installed_only_when_missing_and_only_where_apt_can_run(install, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(list(cmd)))
    monkeypatch.setattr(install, "CHROMIUM", tmp_path / "chromium")
    monkeypatch.setattr(install, "CJK_FONT", tmp_path / "font.ttc")
    monkeypatch.setattr(install, "BROWSER_DIR", tmp_path / "browser")
    monkeypatch.setattr(install.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(install.os, "geteuid", lambda: 0)
    install.ensure_browser_tools()
    assert calls[0][:2] == ["apt-get", "update"] and calls[1][-2:] == ["chromium", "fonts-wqy-microhei"]
    assert calls[2] == ["/usr/bin/npm", "ci", "--no-audit", "--no-fund"]

    calls.clear()  # not root: nothing is installed, and the log says what to do
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    install.ensure_browser_tools()
    assert all(cmd[0] != "apt-get" for cmd in calls) and "fonts-wqy-microhei" in capsys.readouterr().out

    calls.clear()  # everything present: nothing runs
    (tmp_path / "chromium").write_text("")
    (tmp_path / "font.ttc").write_text("")
    (tmp_path / "browser" / "node_modules" / "playwright-core").mkdir(parents=True)
    install.ensure_browser_tools()
    assert calls == []


def test_a_failed_browser_tool_install_is_reported_not_fatal(install, tmp_path, monkeypatch, capsys):
    def fail(cmd, **kwargs):
        raise subprocess.CalledProcessError(100, cmd)

    monkeypatch.setattr(subprocess, "run", fail)
    monkeypatch.setattr(install, "CHROMIUM", tmp_path / "chromium")
    monkeypatch.setattr(install.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(install.os, "geteuid", lambda: 0)
    install.ensure_browser_tools()  # no exception: the rest of the suite still runs
    assert "browser tests will be skipped" in capsys.readouterr().out


def test_redis_server_is_installed_for_the_service_tests_only_when_missing_and_where_apt_can_run(install, tmp_path,
                                                                                               monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(list(cmd)))
    monkeypatch.setattr(install, "REDIS_SERVER", tmp_path / "redis-server")
    monkeypatch.setattr(install.shutil, "which", lambda name: None if name == "redis-server" else f"/usr/bin/{name}")
    monkeypatch.setattr(install.os, "geteuid", lambda: 0)
    install.ensure_service_tools()
    assert calls[0][:2] == ["apt-get", "update"] and calls[1][-1] == "redis-server"
    assert calls[2] == ["service", "redis-server", "stop"]  # the service runs its own Redis, not Debian's

    calls.clear()  # not root: nothing is installed, and the log says what to do
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    install.ensure_service_tools()
    assert calls == [] and "service tests will be skipped" in capsys.readouterr().out

    (tmp_path / "redis-server").write_text("")  # present: nothing runs
    monkeypatch.setattr(install.os, "geteuid", lambda: 0)
    install.ensure_service_tools()
    assert calls == []


def make_comfyui_tar(path, version="9.9.9", extra=()):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        members = [("ComfyUI/main.py", ""), ("ComfyUI/comfy/__init__.py", ""),
                   ("ComfyUI/comfyui_version.py", f'__version__ = "{version}"\n'),
                   ("ComfyUI/requirements.txt", "torch\ntorchaudio\nnumpy\n"), *extra]
        for name, text in members:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


def test_a_comfyui_source_gets_its_own_runtime_named_by_its_version(install, tmp_path, monkeypatch):
    monkeypatch.setattr(install, "RUNTIMES_DIR", tmp_path / "runtimes")
    runtime = install.source_runtime(str(make_comfyui_tar(tmp_path / "src.tar.gz")))
    assert runtime.comfy_dir == tmp_path / "runtimes" / "comfyui-9.9.9" / "ComfyUI"
    assert runtime.python == tmp_path / "runtimes" / "comfyui-9.9.9" / "venv" / "bin" / "python"
    tree = install.unpack_comfyui_source(runtime.source, tmp_path / "staging")
    assert (tree / "main.py").is_file() and install.comfyui_version(tree) == "9.9.9"
    assert install.needs_torchaudio(tree)  # newer ComfyUI lists it and does not start without it
    assert install.comfy_requirements(tree) == ["numpy", "requests"]
    assert install.source_runtime(str(tree)).comfy_dir == runtime.comfy_dir  # a folder works the same way


def test_a_source_whose_members_leave_the_tree_is_refused(install, tmp_path):
    bad = make_comfyui_tar(tmp_path / "bad.tar.gz", extra=[("ComfyUI/../../escaped.txt", "x")])
    with pytest.raises(SystemExit, match="refusing the member"):
        install.unpack_comfyui_source(bad, tmp_path / "staging")
    assert not (tmp_path / "escaped.txt").exists()


def test_comfyui_option_is_taken_out_of_the_pytest_arguments(install):
    assert install.take_comfyui_option(["-k", "loader", "--comfyui", "x.tar.gz"]) == ("x.tar.gz", ["-k", "loader"])
    assert install.take_comfyui_option(["--comfyui=dir", "-x"]) == ("dir", ["-x"])
    assert install.take_comfyui_option(["-x"]) == (None, ["-x"])


def test_fast_runs_only_the_tests_not_marked_live_and_installs_no_browser(install, monkeypatch):
    runs, browser = [], []
    monkeypatch.setattr(install, "ensure_browser_tools", lambda: browser.append(True))
    monkeypatch.setattr(install, "ensure_service_tools", lambda: browser.append(True))
    monkeypatch.setattr(install, "run_in_runtime", lambda module, argv, source=None: runs.append((module, argv)) or 0)
    assert install.main(["test", "--fast", "-k", "loader"]) == 0
    assert runs == [("ruff", ["check", "."]), ("pytest", ["-m", "not live", "-k", "loader"])] and not browser
    runs.clear()
    assert install.main(["test"]) == 0
    assert runs[-1] == ("pytest", ["tests"]) and browser == [True, True]


def test_every_test_has_its_kind_and_the_fast_set_is_in_process():
    """Each folder's tests carry its marker; what `--fast` selects starts no server, browser, training or install."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not live", "tests"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300).stdout
    fast = [line for line in out.splitlines() if "::" in line]
    assert fast and all(line.startswith(("tests/unit/", "tests/client/")) for line in fast), fast[:5]
    assert not any("_server.py" in line or "test_submit_interrupt" in line or "test_quick_training" in line
                   or "test_install_into_an_existing" in line for line in fast)
    marked = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "server or browser", "tests"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300).stdout
    assert {line.split("/")[1] for line in marked.splitlines() if "::" in line} == {"server", "browser"}


def test_the_harness_and_the_client_tests_never_import_comfyui_or_torch():
    """tests/client runs where ComfyUI's Python packages are absent: its conftest, the shared one and the helpers
    import neither ComfyUI nor torch (the fixture checkpoints are written by a subprocess)."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']; "
            "import tests.conftest, tests.client.conftest, zimage_testing.helpers; "
            "import zimage_client.submit, zimage_client.server, zimage_client.download; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'comfy', 'comfy_api', 'folder_paths',"
            " 'comfyui_zimage', 'nodes')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], check=True, cwd=REPO_ROOT.parent)
