"""The two pinned install sets and the commands that use them: the README's test command is what
CI runs, the runtime set holds no test-only package, and every runtime dependency is pinned."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_ONLY = {"torch", "transformers", "pytest", "pytest-xdist"}


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def _pins(name):
    out = {}
    for line in _read(name).splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-r")):
            pkg, _, version = line.partition("==")
            assert version, f"{name}: {line!r} is not an exact pin"
            out[re.sub(r"[-_.]+", "-", pkg).lower()] = version
    return out


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    quick = readme[readme.index("## Quick start"):readme.index("\n## ", readme.index("## Quick start") + 5)]
    first, tests = [b.strip() for b in _bash_blocks(quick)[:2]]
    assert "-r requirements.lock" in first and "requirements-test.lock" not in first
    assert "-r requirements-test.lock" in tests and tests.endswith("python -m pytest")
    ci = [ln for ln in _read(".ci/run").splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [tests]


def test_runtime_and_test_sets_are_separate_and_complete():
    runtime, test = _pins("requirements.lock"), _pins("requirements-test.lock")
    assert not TEST_ONLY & set(runtime)
    assert TEST_ONLY <= set(test)
    assert "-r requirements.lock" in _read("requirements-test.lock").splitlines()
    assert not set(runtime) & set(test)  # each package pinned once
    setup = _read("setup.py")
    install = re.search(r"install_requires=\[(.*?)\]", setup, re.S).group(1)
    for req in re.findall(r'"([A-Za-z0-9_.\-]+)', install):
        assert re.sub(r"[-_.]+", "-", req).lower() in runtime, f"{req} is not pinned in requirements.lock"
    assert 'build-backend = "setuptools.build_meta"' in _read("pyproject.toml")
