"""
Packaging for twisted-nbd.

The package list is written out by hand on purpose: C{twisted/plugins} must
not have an C{__init__.py} (Twisted would skip the directory, and a wheel
that shipped one could overwrite Twisted's own), so C{find_packages()} cannot
see it. C{tests/test_packaging.py} builds a wheel and checks the result.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def read_version() -> str:
    """Read C{__version__} from C{twisted_nbd/__init__.py} without importing it."""
    text = (HERE / "twisted_nbd" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("no __version__ in twisted_nbd/__init__.py")
    return match.group(1)


setup(
    name="twisted-nbd",
    version=read_version(),
    description="A Network Block Device (NBD) server on Twisted.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # Naming the root explicitly makes "pip install -e ." add this directory to
    # sys.path (a static .pth file) instead of installing an import hook that
    # cannot extend twisted.plugins; twistd would then not find the dropin.
    package_dir={"": "."},
    packages=[
        "twisted_nbd",
        "twisted_nbd.backends",
        "twisted_nbd.filters",
        # A namespace-less plugin directory: no __init__.py, never a dropin.cache.
        "twisted.plugins",
    ],
    include_package_data=False,
    # PEP 561: the package's annotations are for its users' type checkers too.
    package_data={"twisted_nbd": ["py.typed"]},
    license="MIT",
    license_files=["LICENSE"],
    install_requires=[
        "zope.interface>=5",
        # TLS (STARTTLS, twisted_nbd/tls.py) is Twisted's, on pyOpenSSL and
        # service_identity. pyOpenSSL has no PSK API (not even
        # 26.4); twisted_nbd/tls_psk.py reaches OpenSSL's PSK functions through
        # cryptography's binding, the one pyOpenSSL uses (every cryptography that
        # pyOpenSSL 25.2+ accepts has them). 25.2 added
        # Context.set_tls13_ciphersuites, which PSK needs for its SHA-256 suites.
        "twisted[tls]>=23.10",
        "pyopenssl>=25.2",
        # --metrics (twisted_nbd/metrics.py, ops.py): the exposition formats.
        "prometheus-client>=0.20",
        # The remote backends: http (Range requests) and s3 (requests signed
        # with botocore) send with treq.
        "treq>=23.11",
        "botocore>=1.31",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6",
            # mypy-zope pins the mypy versions it supports (1.0.17: mypy<2.5);
            # keep the two in step when raising either.
            "mypy>=2.4,<2.5",
            "mypy-zope==1.0.17",
            "ruff>=0.6",
            "build>=1",
            # The packaging test builds without isolation, with these: older
            # setuptools need the wheel package for bdist_wheel.
            "setuptools>=64",
            "wheel",
            # tests/test_bench.py runs bench/run.py --smoke, which draws its chart.
            "matplotlib",
            # tests/test_docs_site.py runs "mkdocs build --strict". Pinned: a new
            # MkDocs or theme release may add a check or a deprecation warning,
            # which strict mode turns into a failure with no change of ours;
            # raise them on purpose, with the docs.
            "mkdocs==1.6.1",
            "mkdocs-material==9.8.2",
        ],
        # The documentation site alone: mkdocs serve / mkdocs build --strict.
        "docs": [
            "mkdocs==1.6.1",
            "mkdocs-material==9.8.2",
        ],
        # bench/run.py: the PNG chart (the rest is the standard library and
        # Debian's fio, nbdcopy, qemu-nbd, nbdkit, nbd-server).
        "bench": [
            "matplotlib",
        ],
        # bench/fuzz.py: the long, coverage-guided fuzzing run (not in the suite).
        "fuzz": [
            "atheris>=2.3",
        ],
    },
    # Backends and filters by name (twisted_nbd.registry): a third-party package
    # adds its own in these groups. twisted_nbd.registry names the same objects,
    # so a source checkout that is not installed has them too.
    entry_points={
        "twisted_nbd.backends": [
            "file = twisted_nbd.backends:file_plugin",
            "memory = twisted_nbd.backends:memory_plugin",
            "pattern = twisted_nbd.backends.pattern:plugin",
            "http = twisted_nbd.backends.http:plugin",
            "nbd = twisted_nbd.backends.nbd:plugin",
            "s3 = twisted_nbd.backends.s3:plugin",
            "rbd = twisted_nbd.backends.rbd:plugin",
        ],
        "twisted_nbd.filters": [
            "blocksize = twisted_nbd.filters.blocksize:plugin",
            "cache = twisted_nbd.filters.cache:plugin",
            "cow = twisted_nbd.filters.cow:plugin",
            "delay = twisted_nbd.filters.delay:plugin",
            "error = twisted_nbd.filters.error:plugin",
            "offset = twisted_nbd.filters.offset:plugin",
            "rate = twisted_nbd.filters.rate:plugin",
            "readonly = twisted_nbd.filters.readonly:plugin",
            "stats = twisted_nbd.filters.stats:plugin",
            "truncate = twisted_nbd.filters.truncate:plugin",
        ],
    },
    zip_safe=False,
    classifiers=[
        "Framework :: Twisted",
        "Typing :: Typed",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: System :: Filesystems",
        "Operating System :: POSIX :: Linux",
    ],
)
