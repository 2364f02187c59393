#!/usr/bin/env python3
"""
TLS benchmark (issue 8, point 7): twisted-nbd over TLS against qemu-nbd and
nbdkit over TLS, on the same certificates, and against plaintext twisted-nbd
(the cost of TLS), driven by fio's nbd engine (libnbd) on 127.0.0.1.

    python3 bench/tls.py [--quick | --smoke] [--repeat 3] [--py-spy DIR] [--json FILE]

Servers (each serves its own page-cached copy of an image of random data):

  - twisted-nbd: twistd -n nbd --image IMG --tls require --tls-certificates DIR
  - qemu-nbd: --object tls-creds-x509,id=tls0,endpoint=server,dir=DIR,verify-peer=no
    --tls-creds tls0 (with bench/run.py's other options)
  - nbdkit: nbdkit --tls=require --tls-certificates=DIR file IMG
  - twisted-nbd-plaintext: twistd -n nbd --image IMG (no TLS)

fio connects with nbds://127.0.0.1:PORT/ (plain nbd:// for the plaintext
server), and its libnbd finds the CA in $HOME/.pki/libnbd: fio's engine
cannot take ?tls-certificates=DIR (see client_prefix). The certificates (a
CA and a server certificate for localhost and 127.0.0.1) are made afresh in
the work directory for each run by tests/tlsfiles.py, and deleted with it.

Everything else (the fio jobs, starting and stopping servers, measuring CPU
and RSS, py-spy, the tables) is bench/run.py's, imported as a module. See
bench/README.md. A benchmark, not a test: the exit status says whether every
run worked, never whether the target was met.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from run import FIO, HOST, BenchError, GiB, MiB, Result, Server, Workload  # noqa: E402

TWISTED = run.TWISTED
QEMU = run.QEMU
NBDKIT = "nbdkit"
PLAINTEXT = "twisted-nbd-plaintext"
#: Every server, twisted-nbd over TLS first, then the peers its numbers are divided by.
ALL_SERVERS = (TWISTED, QEMU, NBDKIT, PLAINTEXT)
#: What bench/run.py's check_server knows each server as.
CHECK_AS = {TWISTED: run.TWISTED, QEMU: run.QEMU, NBDKIT: run.NBDKIT_FILE, PLAINTEXT: run.TWISTED}

#: The family name in the results and in the names of the logs.
FAMILY = "tls"
WORKLOAD_NAMES = ("seq-read-1M-qd8", "seq-write-1M-qd8", "rand-read-4K-qd32")
WORKLOADS = tuple(run.WORKLOADS_BY_NAME[name] for name in WORKLOAD_NAMES)
#: The target: twisted-nbd over TLS against this peer over TLS, on every workload.
TARGET_PEER = QEMU
TARGET_RATIO = 1.0

#: qemu-nbd's TLS object: x509 credentials from DIR, no client certificate asked for.
QEMU_TLS_ID = "tls0"


# -- Certificates and servers -----------------------------------------------------------------


def make_pki(directory: Path) -> Path:
    """
    A fresh CA and server certificate (for localhost and 127.0.0.1) in C{directory},
    in the layout qemu, nbdkit, libnbd and twisted-nbd share; no client certificate.
    """
    if str(run.REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(run.REPO_ROOT))
    try:
        from tests.tlsfiles import make_certificates
    except ImportError as e:
        raise BenchError(
            f"cannot make certificates with tests/tlsfiles.py ({e}); it needs "
            "'cryptography' (pip install -e '.[test]')"
        ) from None
    return make_certificates(directory, client_cn=None)


def tls_launch(
    name: str, port: int | str, log: Path, image: Path | str, certificates: Path | str
) -> run.Launch:
    """
    The command line of one server: bench/run.py's, with its TLS options added.
    """
    if name in (TWISTED, PLAINTEXT):
        tls = (
            []
            if name == PLAINTEXT
            else ["--tls", "require", "--tls-certificates", str(certificates)]
        )
        return run.server_launch(
            run.TWISTED, run.FILE, port, log, image=image, size=0, twisted_args=tls
        )
    if name == QEMU:
        launch = run.server_launch(run.QEMU, run.FILE, port, log, image=image, size=0)
        creds = f"tls-creds-x509,id={QEMU_TLS_ID},endpoint=server,dir={certificates},verify-peer=no"
        options = ["--object", creds, "--tls-creds", QEMU_TLS_ID]
    elif name == NBDKIT:
        launch = run.server_launch(run.NBDKIT_FILE, run.FILE, port, log, image=image, size=0)
        options = ["--tls=require", f"--tls-certificates={certificates}"]
    else:
        raise ValueError(name)
    # Options go right after the program's name (nbdkit's before its plugin).
    launch.argv = [launch.argv[0], *options, *launch.argv[1:]]
    return launch


def tls_uri(port: int | str) -> str:
    """
    libnbd's URI for a TLS server: the CA is found in $HOME/.pki/libnbd (see L{client_prefix}).
    """
    return f"nbds://{HOST}:{port}/"


def client_prefix(home: Path | str) -> list[str]:
    """
    What fio runs under, so that libnbd trusts the run's CA.

    fio's nbd engine connects with C{nbd_connect_uri}, which refuses
    C{?tls-certificates=DIR} (libnbd allows local files in URIs only after
    C{nbd_set_uri_allow_local_file}, which fio does not call). Without it,
    libnbd loads its default directory: C{$HOME/.pki/libnbd} for a user,
    but C{/etc/pki/libnbd} for root; so fio runs with C{HOME} set to a
    directory holding C{.pki/libnbd/ca-cert.pem}, and as root in a user
    namespace of its own (C{unshare --user}: the same process and files,
    but C{geteuid()} is not 0 there). Every server's fio runs the same way.
    """
    prefix = ["env", f"HOME={home}"]
    if os.geteuid() == 0:
        prefix += ["unshare", "--user", "--"]
    return prefix


def make_client_home(directory: Path, certificates: Path) -> Path:
    """A C{HOME} for fio whose C{.pki/libnbd} holds the CA (and nothing else)."""
    pki = directory / ".pki" / "libnbd"
    pki.mkdir(parents=True)
    shutil.copyfile(certificates / "ca-cert.pem", pki / "ca-cert.pem")
    return directory


class TLSServer(Server):
    """
    One server, reached over TLS (C{nbds://}) unless it is the plaintext one.
    """

    def __init__(self, name: str, launch: run.Launch, log: Path, port: int, tls: bool) -> None:
        super().__init__(name, FAMILY, launch, log, port)
        self.tls = tls

    @property
    def uri(self) -> str:
        """The URI fio connects to."""
        return tls_uri(self.port) if self.tls else super().uri


class TLSRunner(run.Runner):
    """
    bench/run.py's runner (fio runs, Measure, py-spy on twisted-nbd), starting the TLS servers.
    """

    def __init__(
        self, config: run.Config, images: run.Images, certificates: Path, client_home: Path
    ) -> None:
        super().__init__(config, images)
        self.certificates = certificates
        self.client_home = client_home

    def client(self, argv: list[str]) -> list[str]:
        """fio's command line, under L{client_prefix}."""
        return super().client([*client_prefix(self.client_home), *argv])

    def start_server(self, name: str, family: str, tag: str, workers: int | None = None) -> Server:
        """
        Start one server on a free port; stopped by L{stop_all} if not before.
        """
        port = run.free_port()
        log = self.config.workdir / f"{tag}.server.log"
        launch = tls_launch(name, port, log, self.images.copies[name], self.certificates)
        server = TLSServer(name, launch, log, port, tls=name != PLAINTEXT)
        self.running.append(server)
        try:
            server.start()
        except BaseException:
            self.stop_server(server)
            raise
        return server

    def run_all(self, servers: Sequence[str]) -> None:
        """
        Pass after pass, each workload against every server in turn, each started for its run.
        """
        config = self.config
        for repeat in range(config.repeat):
            order = self.order(servers, repeat)
            for workload in config.workloads:
                for name in order:
                    label = self.label(repeat, f"{workload.name:<18}", f"{name:<22}")
                    tag = run.run_tag(FIO, FAMILY, workload.name, name, repeat)
                    server: Server | None = None
                    try:
                        server = self.start_server(name, FAMILY, tag)
                    except BenchError as e:
                        result = Result(
                            family=FAMILY, workload=workload.name, server=name, repeat=repeat
                        )
                        result.error = f"BenchError: {e}"
                    else:
                        result = self.fio_run(server, workload, repeat)
                    finally:
                        if server is not None:
                            self.stop_server(server)
                            # Dirty pages of the write workload are flushed now.
                            os.sync()
                    self.results.append(result)
                    print(label, run.describe_result(result), flush=True)


def session_of(log: Path) -> str | None:
    """The TLS version and cipher twisted-nbd logged for a client, if it did."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"(TLSv1\.[0-3]), ([A-Z0-9_-]+)", text)
    return f"{match.group(1)} {match.group(2)}" if match else None


# -- Pre-flight -------------------------------------------------------------------------------


def check_server(name: str) -> str | None:
    """
    Why C{name} cannot run here (with TLS), or None if it can.
    """
    why = run.check_server(CHECK_AS[name])
    if why is not None or name == PLAINTEXT:
        return why
    if name == TWISTED:
        code, out = run.tool_output([*run.twistd_argv(), "nbd", "--help"])
        if "--tls-certificates" not in out:
            return "twistd nbd has no --tls-certificates option (twisted_nbd/tls.py)"
    if name == NBDKIT and "tls=yes" not in run.tool_output(["nbdkit", "--dump-config"])[1]:
        return "this nbdkit was built without TLS (GnuTLS)"
    if name == QEMU and "--tls-creds" not in run.tool_output(["qemu-nbd", "--help"])[1]:
        return "this qemu-nbd has no --tls-creds"
    return None


def tls_versions(servers: Sequence[str]) -> dict[str, str]:
    """
    bench/run.py's versions, with pyOpenSSL's and OpenSSL's (twisted-nbd's TLS).
    """
    found = run.versions([CHECK_AS[s] for s in servers])
    code, out = run.tool_output(
        [
            sys.executable,
            "-c",
            "import OpenSSL, OpenSSL.SSL as S; "
            "print(OpenSSL.__version__); print(S.OpenSSL_version(S.OPENSSL_VERSION).decode())",
        ]
    )
    lines = out.strip().splitlines()
    if code == 0 and len(lines) == 2:
        found["pyOpenSSL"], found["OpenSSL (twisted-nbd)"] = lines
    return found


# -- Summaries and tables ---------------------------------------------------------------------


def summarize(
    results: list[Result], workloads: Sequence[Workload], servers: Sequence[str]
) -> list[dict[str, Any]]:
    """
    Per workload and server the medians over the passes, and twisted-nbd's ratios
    (IOPS over IOPS, which for one block size is MiB/s over MiB/s).
    """
    rows = []
    for workload in workloads:
        row: dict[str, Any] = {
            "workload": workload.name,
            "rw": workload.rw,
            "bs": workload.bs,
            "iodepth": workload.iodepth,
            "servers": {},
            "ratios": {},
        }
        for server in servers:
            good = [
                r for r in results if r.ok and r.workload == workload.name and r.server == server
            ]
            if good:
                numbers = run.median_of(good, run.FIO_FIELDS)
                # Server CPU seconds per GiB moved: what TLS costs when CPU is the limit.
                numbers["server_cpu_s_per_gib"] = (
                    numbers["server_cpu_pct"] / 100 / (numbers["mib_s"] * MiB / GiB)
                    if numbers["mib_s"]
                    else None
                )
                row["servers"][server] = numbers
        ours = row["servers"].get(TWISTED)
        for peer in ALL_SERVERS[1:]:
            theirs = row["servers"].get(peer)
            if ours and theirs and theirs["iops"]:
                row["ratios"][f"{TWISTED}/{peer}"] = ours["iops"] / theirs["iops"]
        rows.append(row)
    return rows


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Issue 8's target: twisted-nbd over TLS >= 1.0 x qemu-nbd over TLS on each workload.
    """
    return [
        run.ratio_target(rows, FAMILY, name, TARGET_PEER, TARGET_RATIO) for name in WORKLOAD_NAMES
    ]


def ratio_table(servers: Sequence[str], rows: list[dict[str, Any]], markdown: bool) -> str:
    """
    twisted-nbd over TLS against each peer: the TLS servers, and itself without TLS.
    """
    peers = [p for p in ALL_SERVERS[1:] if p in servers]
    labels = {p: f"{TWISTED} / {p}" + (" (TLS/plaintext)" if p == PLAINTEXT else "") for p in peers}
    header = ["workload", *(labels[p] for p in peers)]
    body = [
        [row["workload"], *(run.ratio_cell(row["ratios"].get(f"{TWISTED}/{p}")) for p in peers)]
        for row in rows
    ]
    return run.render(header, body, markdown)


def cpu_table(servers: Sequence[str], rows: list[dict[str, Any]], markdown: bool) -> str:
    """
    The server's CPU (% of one core) per workload and server, and its CPU seconds per GiB.
    """
    header = ["workload", *(f"{s} CPU %" for s in servers), *(f"{s} CPU s/GiB" for s in servers)]
    body = []
    for row in rows:
        cells = [row["workload"]]
        numbers = [row["servers"].get(s) for s in servers]
        cells += ["failed" if n is None else f"{n['server_cpu_pct']:.0f}" for n in numbers]
        cells += [
            "failed" if n is None or n["server_cpu_s_per_gib"] is None
            else f"{n['server_cpu_s_per_gib']:.2f}"
            for n in numbers
        ]  # fmt: skip
        body.append(cells)
    return run.render(header, body, markdown)


def report(document: dict[str, Any], markdown: bool) -> str:
    """
    Every table of the run, as text or Markdown.
    """
    servers = document["config"]["servers"]
    rows = document["summary"]
    out: list[str] = []

    def heading(text: str) -> None:
        out.append("")
        out.append(f"### {text}" if markdown else f"== {text}")
        out.append("")

    heading("fio over TLS (twisted-nbd-plaintext without): MiB/s")
    out.append(run.throughput_table(servers, rows, markdown))
    heading("twisted-nbd over TLS: its throughput over each peer's")
    out.append(ratio_table(servers, rows, markdown))
    heading("Server CPU (% of one core; CPU seconds per GiB moved)")
    out.append(cpu_table(servers, rows, markdown))
    heading("IOPS, latency, CPU (% of one core) and peak RSS")
    out.append(run.detail_table(servers, rows, markdown))
    sessions = document["tls_sessions"]
    if sessions:
        out.append("")
        out.append(f"twisted-nbd's TLS sessions (from its log): {', '.join(sorted(sessions))}")
    heading("TARGETS (issue 8, from this run's medians)")
    out.append(run.targets_text(document["targets"], markdown))
    return "\n".join(out)


# -- Where the time goes ----------------------------------------------------------------------

#: The layers a profile's samples are put in, by the innermost frame that belongs to one.
LAYERS = (
    ("OpenSSL via pyOpenSSL (SSL_read, SSL_write, BIO)", re.compile(r"\(OpenSSL/")),
    ("Twisted's TLSMemoryBIOProtocol", re.compile(r"\(twisted/protocols/tls\.py")),
    ("twisted-nbd", re.compile(r"\(twisted_nbd/")),
    ("Twisted (reactor, TCP)", re.compile(r"\(twisted/")),
)
OTHER_LAYER = "other (stdlib, cffi, interpreter)"


def layer_breakdown(path: Path, top: int = 8) -> dict[str, Any]:
    """
    Where a py-spy raw profile's samples went, by layer: each sample counts for
    the innermost frame that is in OpenSSL/ (pyOpenSSL), twisted/protocols/tls.py,
    twisted_nbd/ or twisted/ (so a stdlib helper counts for its caller); and the
    pyOpenSSL functions with the most samples.
    """
    layers: Counter[str] = Counter()
    openssl: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        stack = re.sub(r'^process \d+:(?:"[^"]*")?;', "", stack)
        frames = [run.strip_line_number(f) for f in stack.split(";") if f]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        layer = OTHER_LAYER
        for frame in reversed(frames):
            found = next((name for name, pattern in LAYERS if pattern.search(frame)), None)
            if found is not None:
                layer = found
                if layer == LAYERS[0][0]:
                    openssl[frame] += count
                break
        layers[layer] += count
    total = sum(layers.values())
    return {
        "samples": total,
        "layers": {name: layers[name] for name, _ in LAYERS} | {OTHER_LAYER: layers[OTHER_LAYER]},
        "openssl_functions": dict(openssl.most_common(top)),
    }


def describe_breakdown(breakdown: dict[str, Any], server_cpu_pct: float | None) -> list[str]:
    """The layer breakdown of one profile, as lines of text."""
    total = breakdown["samples"]
    if not total:
        return ["(no samples)"]
    lines = ["by layer (innermost frame of a known layer):"]
    for name, count in breakdown["layers"].items():
        lines.append(f"  {100 * count / total:5.1f}%  {name}")
    if breakdown["openssl_functions"]:
        lines.append("pyOpenSSL functions (self, % of all samples):")
        for frame, count in breakdown["openssl_functions"].items():
            lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    if server_cpu_pct is not None:
        lines.append(
            f"the server used {server_cpu_pct:.0f}% of a core in this run; py-spy --gil sees "
            "only the thread holding the GIL, so time in C with the GIL released is missing"
        )
    return lines


# -- The command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """
    The command line, with the defaults --quick and --smoke imply filled in.
    """
    parser = argparse.ArgumentParser(
        description=(
            "Compare twisted-nbd over TLS with qemu-nbd and nbdkit over TLS (same certificates) "
            "and with plaintext twisted-nbd, on 127.0.0.1 with fio's nbd engine."
        ),
        epilog=f"Workloads: {', '.join(WORKLOAD_NAMES)}. Servers: {', '.join(ALL_SERVERS)}.",
    )
    run.add_common_options(
        parser,
        smoke_help="check that it works (not for numbers): a 32M image, 1 s runs, no ramp, "
        "one pass",
        keep_help="keep the work directory (images, certificates, logs)",
    )
    parser.add_argument(
        "--servers",
        help=f"comma-separated subset of {','.join(ALL_SERVERS)} (a server named here must run)",
    )
    parser.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOAD_NAMES)}")
    parser.add_argument(
        "--json",
        type=Path,
        help="where the JSON goes (default bench/results/DATE-HOST-tls.json, DATE in UTC)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record twisted-nbd's TLS runs with py-spy into DIR and print where the time goes "
        "(this slows twisted-nbd down: use for profiling, not for numbers)",
    )
    args = parser.parse_args(argv)
    run.finish_common_options(parser, args)
    args.explicit_servers = args.servers is not None
    servers = run.split_list(args.servers or ",".join(ALL_SERVERS))
    if set(servers) - set(ALL_SERVERS) or not servers:
        parser.error(f"--servers: choose from {', '.join(ALL_SERVERS)}")
    args.servers = [s for s in ALL_SERVERS if s in servers]
    chosen = run.split_list(args.workloads or ",".join(WORKLOAD_NAMES))
    if set(chosen) - set(WORKLOAD_NAMES) or not chosen:
        parser.error(f"--workloads: choose from {', '.join(WORKLOAD_NAMES)}")
    args.workloads = [w for w in WORKLOADS if w.name in chosen]
    return args


def select_servers(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """
    The servers that run, and why the others were left out.

    @raise BenchError: twisted-nbd cannot run, or a server named with --servers cannot.
    """
    skipped = {name: why for name in args.servers if (why := check_server(name)) is not None}
    if TWISTED in skipped:
        raise BenchError(skipped[TWISTED])
    if args.explicit_servers and skipped:
        raise BenchError(
            "missing servers named with --servers:\n  - "
            + "\n  - ".join(f"{k}: {v}" for k, v in skipped.items())
        )
    return [s for s in args.servers if s not in skipped], skipped


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark; 0 if every run worked, 1 if some failed, 2 if it could not run.
    """
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, run.on_sigterm)
    started = datetime.datetime.now(datetime.UTC)
    json_path: Path = args.json or run.default_json_path(started).with_suffix("")
    if args.json is None:
        json_path = json_path.with_name(json_path.name + "-tls.json")
    notes: list[str] = []
    try:
        problems = run.check_tools([FIO], [run.FILE], False, args.py_spy is not None, False)
        if os.geteuid() == 0 and run.tool_output(["unshare", "--user", "--", "true"])[0] != 0:
            problems.append(
                "as root, fio runs under 'unshare --user' (so that libnbd reads the CA from "
                "$HOME/.pki/libnbd), and that failed here: run as another user"
            )
        if problems:
            raise BenchError("missing tools:\n  - " + "\n  - ".join(problems))
        servers, skipped = select_servers(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    for name, why in skipped.items():
        notes.append(f"{name} skipped: {why}")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="twisted-nbd-bench-tls-", dir=args.workdir))
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
        notes.append("twisted-nbd's TLS runs were recorded with py-spy: their numbers suffer")
    config = run.Config(
        families={FAMILY: servers},
        workloads=args.workloads,
        sections=[FIO],
        size=args.size,
        runtime=args.runtime,
        ramp=args.ramp,
        repeat=args.repeat,
        pin=False,
        twisted_args=[],
        workers=[],
        workers_supported=False,
        workdir=workdir,
        pyspy_dir=args.py_spy,
        max_steal=args.max_steal,
    )
    runner: TLSRunner | None = None
    try:
        found = tls_versions(servers)
        host = run.machine()
        print(f"machine: {host['cpus']} CPUs ({host['cpu model']}), kernel {host['kernel']}")
        print("versions: " + "; ".join(f"{k} {v}" for k, v in found.items()))
        for note in notes:
            print(f"note: {note}")
        print(f"servers: {', '.join(servers)}")
        host["busy before the run"] = round(run.wait_until_idle(args.wait_idle), 2)
        if host["busy before the run"] > 0.15:
            print(
                f"warning: the CPUs were {100 * host['busy before the run']:.0f}% busy before "
                "the run: something else is running, and the numbers will suffer"
            )
        certificates = make_pki(workdir / "pki")
        print(
            f"preparing certificates, a {run.human_size(config.size)} reference image and "
            f"{len(servers)} copies in {workdir}"
        )
        images = run.make_images(workdir, config.size, servers, 0)
        client_home = make_client_home(workdir / "client-home", certificates)
        runner = TLSRunner(config, images, certificates, client_home)
        clock = time.monotonic()
        runner.run_all(servers)
        elapsed = time.monotonic() - clock
        document = build_document(
            config, runner, servers, host, found, started, notes, skipped, elapsed
        )
        print()
        print(
            f"{run.human_size(config.size)} image, {config.runtime} s per fio run after "
            f"{config.ramp} s ramp, {config.repeat} pass(es), medians; ratios are twisted-nbd's "
            f"(over TLS) IOPS over the peer's; measured in {elapsed:.0f} s"
        )
        print(report(document, markdown=False))
        if args.markdown:
            print("\n== The same tables in Markdown")
            print(report(document, markdown=True))
        for profile in document["profiles"]:
            print(f"\n== Where the time goes: py-spy {profile['path']}")
            wall = run.PySpy.RATE * (config.runtime + config.ramp)
            print("\n".join(run.summarize_profile(Path(profile["path"]), wall)))
            print("\n".join(describe_breakdown(profile, profile["server_cpu_pct"])))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {json_path}")
        if args.keep:
            print(f"kept {workdir}")
        return 0 if all(r.ok for r in runner.results) else 1
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping the servers", file=sys.stderr)
        return 130
    except SystemExit:
        print("\nbench: terminated; stopping the servers", file=sys.stderr)
        raise
    finally:
        if runner is not None:
            runner.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def build_document(
    config: run.Config,
    runner: TLSRunner,
    servers: Sequence[str],
    host: dict[str, Any],
    found: dict[str, str],
    started: datetime.datetime,
    notes: list[str],
    skipped: dict[str, str],
    elapsed: float,
) -> dict[str, Any]:
    """
    Everything the run measured, for --json (and the tables, drawn from it).
    """
    summary = summarize(runner.results, config.workloads, servers)
    sessions = {
        session
        for log in config.workdir.glob(f"*.{TWISTED}.*.server.log")
        if (session := session_of(log)) is not None
    }
    profiles = []
    if config.pyspy_dir is not None:
        for workload in config.workloads:
            for repeat in range(config.repeat):
                stem = run.run_tag(FIO, FAMILY, workload.name, None, repeat)
                path = config.pyspy_dir / f"{stem}.txt"
                if not path.exists():
                    continue
                result = next(
                    (
                        r
                        for r in runner.results
                        if r.ok
                        and r.server == TWISTED
                        and r.workload == workload.name
                        and r.repeat == repeat
                    ),
                    None,
                )
                profiles.append(
                    {
                        "path": str(path),
                        "workload": workload.name,
                        "repeat": repeat,
                        "server_cpu_pct": result.server_cpu_pct if result else None,
                        **layer_breakdown(path),
                    }
                )
    commands = {name: tls_launch(name, "PORT", Path("LOG"), "IMG", "DIR").argv for name in servers}
    return {
        "schema": 1,
        "benchmark": "tls",
        "date": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": host,
        "versions": found,
        "notes": notes,
        "config": {
            "size": config.size,
            "runtime_s": config.runtime,
            "ramp_s": config.ramp,
            "repeat": config.repeat,
            "servers": list(servers),
            "skipped_servers": skipped,
            "workloads": [dataclasses.asdict(w) for w in config.workloads],
            "commands": commands,
            "fio": [
                *client_prefix("HOME"),
                *run.fio_argv(
                    config.workloads[0], tls_uri("PORT"), config.runtime, config.ramp, Path("OUT")
                ),
            ],
            "certificates": "a fresh CA and ECDSA P-256 server certificate per run "
            "(tests/tlsfiles.py) in DIR; no client certificate; fio's libnbd finds the CA "
            "in HOME/.pki/libnbd/ca-cert.pem",
        },
        "tls_sessions": sorted(sessions),
        "summary": summary,
        "results": [dataclasses.asdict(r) for r in runner.results],
        "targets": evaluate_targets(summary),
        "profiles": profiles,
    }


if __name__ == "__main__":
    sys.exit(main())
