"""A throwaway PostgreSQL cluster for the tests (docs/postgres.md): initdb in a temporary folder, a server on a
free loopback port with its socket in that folder, stopped and deleted at the end; or the server that
$AIGC_TEST_POSTGRES_URL names. Each test gets a database of its own (`create_database`, ~50 ms).

Hand-written rather than pytest-postgresql: that plugin runs initdb as the current user, and initdb refuses
root, which CI runs as; here root runs the server as the `postgres` user (runuser).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

ENV = "AIGC_TEST_POSTGRES_URL"  # an existing server's database; its role needs CREATEDB
DATABASE = "aigc_test"  # the database `cluster` makes and yields
TIMEZONE = "Asia/Shanghai"  # not UTC, so that the store's conversion of times to UTC is exercised
START_TIMEOUT_S = 60


class Unavailable(Exception):
    """No PostgreSQL server can be started here; the message says why (the tests skip with it)."""


def find_bin() -> Path:
    """The folder of initdb and pg_ctl: PATH's, else the newest /usr/lib/postgresql/*/bin (Debian's)."""
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).resolve().parent / "pg_ctl").is_file():
        return Path(initdb).resolve().parent
    folders = [Path(f) for f in glob.glob("/usr/lib/postgresql/*/bin") if Path(f).parent.name.isdigit()]
    for folder in sorted(folders, key=_major, reverse=True):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise Unavailable("no PostgreSQL server binaries: initdb and pg_ctl are neither on PATH nor in "
                      "/usr/lib/postgresql/*/bin (apt-get install postgresql, or set AIGC_TEST_POSTGRES_URL)")


def _major(bin_dir: Path) -> int:
    return int(bin_dir.parent.name)  # /usr/lib/postgresql/15/bin: 15


def _as_postgres() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that runs the server's programs: none for a user, runuser for root (initdb refuses
    to run as root)."""
    if os.geteuid() != 0:
        return [], None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise Unavailable("running as root, and there is no `postgres` user to run initdb as "
                          "(initdb refuses root)") from None
    runuser = shutil.which("runuser", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if runuser is None:
        raise Unavailable("running as root, and there is no runuser to run initdb as the `postgres` user")
    return [runuser, "-u", "postgres", "--"], user


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], what: str, log: Path | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log and log.is_file() else ""
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout}{done.stderr}{tail}")


@contextlib.contextmanager
def cluster() -> Iterator[str]:
    """A new cluster, trust authentication on loopback only: yields the URL of its database `aigc_test`."""
    bin_dir = find_bin()
    prefix, user = _as_postgres()
    folder = Path(tempfile.mkdtemp(prefix="aigc-pg-", dir="/tmp"))  # short: a socket path has ~100 bytes
    try:
        if user is not None:
            os.chown(folder, user.pw_uid, user.pw_gid)
        data, log, port = folder / "data", folder / "server.log", _free_port()
        _run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
              "--no-locale", "--no-sync"], "initdb")
        # fsync off: a test cluster need not survive a power cut (the server itself is never killed here)
        options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off "
                   f"-c TimeZone={TIMEZONE}")
        _run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
              "-t", str(START_TIMEOUT_S), "start"], "pg_ctl start", log)
        try:
            server = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
            _admin(server, f'CREATE DATABASE "{DATABASE}"')
            yield sa.make_url(server).set(database=DATABASE).render_as_string(hide_password=False)
        finally:
            _run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                 "pg_ctl stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def server_url() -> Iterator[str]:
    """$AIGC_TEST_POSTGRES_URL when set, else a throwaway `cluster()`."""
    if os.environ.get(ENV):
        yield os.environ[ENV]
        return
    with cluster() as url:
        yield url


def create_database(server: str) -> str:
    """A new empty database on the server of the URL `server`; returns its URL."""
    url = sa.make_url(server).set(database=f"test_{secrets.token_hex(6)}")
    _admin(server, f'CREATE DATABASE "{url.database}"')
    return url.render_as_string(hide_password=False)


def drop_database(server: str, url: str) -> None:
    """Drop the database of `url`, closing whatever connections are still open to it."""
    _admin(server, f'DROP DATABASE IF EXISTS "{sa.make_url(url).database}" WITH (FORCE)')


def _admin(server: str, statement: str) -> None:
    with _admin_engine(server).connect() as connection:
        connection.exec_driver_sql(statement)


@functools.cache
def _admin_engine(server: str) -> sa.Engine:
    """One engine per server (made once: ~100 ms of each CREATE DATABASE was the engine's first connect);
    no pool, so that no connection stays open to a database about to be dropped."""
    return sa.create_engine(server, poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")
