"""The download stage against a real loopback server with injected faults."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from core.errors import DownloadError, PermanentDownloadError, VerificationError
from demo.loopback import Fault, FileServer
from storage.digests import sha256_of
from storage.folders import IDENTITIES
from storage.layout import LOCKS
from tasks.download import Action, PartState, download_file, is_transient, plan_download

CONTENT = os.urandom(300_000)
SHA256 = hashlib.sha256(CONTENT).hexdigest()
NAME = "notMNIST_small.tar.gz"


def fetch(server: FileServer, dest: Path, **options) -> Path:
    options.setdefault("expected_bytes", len(CONTENT))
    options.setdefault("backoff_base_seconds", 0.01)
    return download_file(server.url(NAME), dest, **options)


def test_downloads_verifies_and_leaves_no_partial_file(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    path = fetch(file_server, tmp_path / "raw", sha256=SHA256)
    assert path == tmp_path / "raw" / NAME
    assert path.read_bytes() == CONTENT
    assert sorted(p.name for p in path.parent.iterdir() if p.name not in (LOCKS, IDENTITIES)) == [NAME]


def test_a_file_in_place_is_not_hashed_again_until_it_is_written_to(file_server, tmp_path, monkeypatch):
    """The rerun's check trusts the sha256 recorded with the file's size, times and inode; a same-size rewrite moves
    its change time, so it is hashed, found wrong and downloaded again."""
    import storage.folders as folders

    file_server.put(NAME, CONTENT)
    path = fetch(file_server, tmp_path, sha256=SHA256)
    hashed = []
    monkeypatch.setattr(folders, "sha256_of", lambda file: hashed.append(file) or sha256_of(file))
    assert fetch(file_server, tmp_path, sha256=SHA256) == path and hashed == []
    path.write_bytes(b"x" * len(CONTENT))
    assert fetch(file_server, tmp_path, sha256=SHA256).read_bytes() == CONTENT and hashed == [path]


def test_verified_file_in_place_is_reused_without_any_request(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    fetch(file_server, tmp_path, sha256=SHA256)
    before = len(file_server.state.requests)
    assert fetch(file_server, tmp_path, sha256=SHA256).read_bytes() == CONTENT
    assert len(file_server.state.requests) == before


def test_bad_file_in_place_is_replaced(file_server, tmp_path):
    (tmp_path / NAME).write_bytes(b"<html>403 Forbidden</html>")  # what the seed's urlretrieve left
    file_server.put(NAME, CONTENT)
    assert fetch(file_server, tmp_path).read_bytes() == CONTENT


def test_dropped_connection_resumes_with_range_and_if_range(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    file_server.add_faults(NAME, Fault(drop_after=100_000))
    path = fetch(file_server, tmp_path, sha256=SHA256)
    assert path.read_bytes() == CONTENT
    first, second = file_server.requests_for(NAME)
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=100000-"
    assert second.headers["If-Range"].startswith('"')
    assert second.status == 206
    assert file_server.body_bytes_sent(NAME) == len(CONTENT)  # not one byte fetched twice


def test_rerun_after_failed_run_resumes_from_the_part_file(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    file_server.add_faults(NAME, Fault(drop_after=120_000))
    with pytest.raises(DownloadError, match="rerun to resume"):
        fetch(file_server, tmp_path, retries=0)
    assert (tmp_path / (NAME + ".part")).stat().st_size == 120_000
    assert not (tmp_path / NAME).exists()

    sent_before = file_server.body_bytes_sent(NAME)
    path = fetch(file_server, tmp_path, sha256=SHA256)  # a new call: the resumed file is hashed whole
    assert path.read_bytes() == CONTENT
    assert file_server.requests_for(NAME)[-1].headers["Range"] == "bytes=120000-"
    assert file_server.body_bytes_sent(NAME) - sent_before == len(CONTENT) - 120_000


def test_server_ignoring_range_restarts_from_zero_without_duplicates(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    file_server.add_faults(NAME, Fault(drop_after=50_000), Fault(ignore_range=True))
    path = fetch(file_server, tmp_path, sha256=SHA256)
    assert path.read_bytes() == CONTENT
    assert [r.status for r in file_server.requests_for(NAME)] == [200, 200]


def test_file_changed_on_the_server_restarts_from_zero(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    changed = os.urandom(len(CONTENT))
    file_server.add_faults(NAME, Fault(drop_after=50_000), Fault(replace_with=changed))
    path = fetch(file_server, tmp_path)
    assert path.read_bytes() == changed  # If-Range did not match, so no splice of two files
    assert file_server.requests_for(NAME)[-1].status == 200


def test_a_file_changed_on_a_server_without_validators_is_never_spliced(file_server, tmp_path):
    """Size checked only (the notMNIST defaults), no ETag, no Last-Modified: the resume asks again for the bytes
    before the resume point, finds them changed, and starts over."""
    file_server.put(NAME, CONTENT)
    changed = os.urandom(len(CONTENT))
    file_server.add_faults(NAME, Fault(drop_after=50_000, no_validators=True),
                           Fault(replace_with=changed, no_validators=True), Fault(no_validators=True))
    path = fetch(file_server, tmp_path, sha256=None)
    assert path.read_bytes() == changed  # the new file whole, not 50,000 bytes of the old one before it
    first, resumed, restarted = file_server.requests_for(NAME)
    assert resumed.headers["Range"] == f"bytes={50_000 - 65_536 if 50_000 > 65_536 else 0}-" and resumed.status == 206
    assert "Range" not in restarted.headers and restarted.status == 200


def test_an_unchanged_file_on_a_server_without_validators_resumes_after_checking_the_overlap(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    file_server.add_faults(NAME, Fault(drop_after=150_000, no_validators=True), Fault(no_validators=True))
    path = fetch(file_server, tmp_path, sha256=SHA256)
    assert path.read_bytes() == CONTENT
    first, resumed = file_server.requests_for(NAME)
    assert resumed.headers["Range"] == f"bytes={150_000 - 65_536}-" and resumed.status == 206
    assert file_server.body_bytes_sent(NAME) - first.body_bytes == len(CONTENT) - 150_000 + 65_536  # the rest, and the overlap


def test_partial_answer_from_a_changed_file_is_not_appended(file_server, tmp_path):
    """A server that ignores If-Range but changes the ETag: the 206 body must not be spliced on."""
    file_server.put(NAME, CONTENT)
    part = tmp_path / (NAME + ".part")
    part.write_bytes(CONTENT[:1000])
    (tmp_path / (NAME + ".part.json")).write_text(json.dumps({"url": file_server.url(NAME), "etag": '"old"'}))
    file_server.add_faults(NAME, Fault())  # the real server honours If-Range, so fake the stale validator
    path = fetch(file_server, tmp_path, sha256=SHA256)
    assert path.read_bytes() == CONTENT


@pytest.mark.parametrize("status", [500, 503, 408, 429], ids=["500", "503", "408", "429"])
def test_transient_errors_are_retried_then_succeed(file_server, tmp_path, status):
    file_server.put(NAME, CONTENT)
    file_server.add_faults(NAME, Fault(status=status), Fault(status=status))
    assert fetch(file_server, tmp_path, sha256=SHA256).read_bytes() == CONTENT
    assert [r.status for r in file_server.requests_for(NAME)] == [status, status, 200]


def test_transient_errors_past_the_retry_budget_fail_with_advice(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    file_server.add_faults(NAME, *[Fault(status=503)] * 3)
    with pytest.raises(DownloadError, match=r"after 3 attempts .*HTTP 503.*Rerun to try again"):
        fetch(file_server, tmp_path, retries=2)
    assert len(file_server.requests_for(NAME)) == 3


@pytest.mark.parametrize("status", [404, 403, 401], ids=["404", "403", "401"])
def test_client_errors_fail_at_once(file_server, tmp_path, status):
    file_server.put(NAME, CONTENT)
    file_server.add_faults(NAME, Fault(status=status, body=b"<html>Forbidden</html>"))
    with pytest.raises(PermanentDownloadError, match=f"HTTP {status}.*check the URL"):
        fetch(file_server, tmp_path)
    assert len(file_server.requests_for(NAME)) == 1
    assert not (tmp_path / NAME).exists()


def test_missing_file_is_a_404(file_server, tmp_path):
    with pytest.raises(PermanentDownloadError, match="HTTP 404"):
        fetch(file_server, tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"expected_bytes": len(CONTENT) + 1}, f"expected {len(CONTENT) + 1:,} bytes, got {len(CONTENT):,}"),
        ({"sha256": "0" * 64}, f"expected sha256 0{{64}}, got {SHA256}"),
    ],
    ids=["size", "sha256"],
)
def test_mismatch_deletes_the_bad_file_and_names_expected_and_got(file_server, tmp_path, options, message):
    file_server.put(NAME, CONTENT)
    with pytest.raises(VerificationError, match=message) as caught:
        fetch(file_server, tmp_path, **options)
    assert file_server.url(NAME) in str(caught.value)
    assert not any(p.name.startswith(NAME) and not p.name.endswith(".lock") for p in tmp_path.iterdir())


def test_short_error_page_saved_as_the_archive_is_refused(file_server, tmp_path):
    file_server.put(NAME, b"<html>403 Forbidden</html>" + b" " * 396)  # the 422-byte page users got
    with pytest.raises(VerificationError, match="expected 300,000 bytes, got 422"):
        fetch(file_server, tmp_path)


@pytest.mark.parametrize("validator", [None, "etag"], ids=["no-validator", "etag"])
def test_complete_part_file_is_verified_not_fetched_again(file_server, tmp_path, validator):
    file_server.put(NAME, CONTENT)
    (tmp_path / (NAME + ".part")).write_bytes(CONTENT)  # a crash between the last byte and the rename
    etag = requests.head(file_server.url(NAME), timeout=10).headers["ETag"] if validator else None
    file_server.state.requests.clear()
    (tmp_path / (NAME + ".part.json")).write_text(json.dumps({"url": file_server.url(NAME), "etag": etag}))
    assert fetch(file_server, tmp_path, sha256=SHA256).read_bytes() == CONTENT
    (request,) = file_server.requests_for(NAME)
    if validator:  # the range after the last byte: 416, nothing sent
        assert request.status == 416 and file_server.body_bytes_sent(NAME) == 0
    else:  # no validator: only the last 64 KiB, to check that they are still the server's
        assert request.status == 206 and file_server.body_bytes_sent(NAME) == 65_536


def test_part_file_of_another_url_is_not_resumed(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    (tmp_path / (NAME + ".part")).write_bytes(b"x" * 1000)
    (tmp_path / (NAME + ".part.json")).write_text(json.dumps({"url": "http://127.0.0.1:1/other"}))
    assert fetch(file_server, tmp_path, sha256=SHA256).read_bytes() == CONTENT
    assert "Range" not in file_server.requests_for(NAME)[0].headers


@pytest.mark.parametrize("form", ["file-url", "path"], ids=["file-url", "path"])
def test_local_sources_are_copied_with_the_same_checks(tmp_path, form):
    source = tmp_path / "mirror" / NAME
    source.parent.mkdir()
    source.write_bytes(CONTENT)
    url = source.as_uri() if form == "file-url" else str(source)
    path = download_file(url, tmp_path / "raw", expected_bytes=len(CONTENT), sha256=SHA256)
    assert path.read_bytes() == CONTENT
    with pytest.raises(VerificationError, match=r"is 300,000 bytes, more than the 1 expected; stopped and deleted"):
        download_file(url, tmp_path / "other", expected_bytes=1)
    assert not (tmp_path / "other" / (NAME + ".part")).exists()


def test_missing_local_source_is_a_clear_error(tmp_path):
    with pytest.raises(PermanentDownloadError, match="no such file"):
        download_file((tmp_path / "absent.tar.gz").as_uri(), tmp_path)


def test_two_processes_downloading_the_same_file_do_not_corrupt_it(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    script = (
        "import sys; from tasks.download import download_file; "
        f"download_file(sys.argv[1], sys.argv[2], expected_bytes={len(CONTENT)}, sha256='{SHA256}')"
    )
    root = Path(__file__).resolve().parents[2]
    workers = [
        subprocess.Popen([sys.executable, "-c", script, file_server.url(NAME), str(tmp_path)], cwd=root)
        for _ in range(2)
    ]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    assert (tmp_path / NAME).read_bytes() == CONTENT
    assert file_server.body_bytes_sent(NAME) == len(CONTENT)  # the second waited, then reused the file


def test_plan_download_decides_from_the_files_on_disk(tmp_path):
    target, part = tmp_path / NAME, tmp_path / (NAME + ".part")
    state = PartState("http://127.0.0.1/x")
    assert plan_download(target, part, None, state.url, expected_bytes=10, sha256=None) is Action.START
    part.write_bytes(b"12345")
    assert plan_download(target, part, state, state.url, expected_bytes=10, sha256=None) is Action.RESUME
    assert plan_download(target, part, state, "http://127.0.0.1/y", expected_bytes=10, sha256=None) is Action.START
    assert plan_download(target, part, state, state.url, expected_bytes=3, sha256=None) is Action.START
    target.write_bytes(b"0123456789")
    assert plan_download(target, part, state, state.url, expected_bytes=10, sha256=None) is Action.REUSE
    assert plan_download(target, part, state, state.url, expected_bytes=11, sha256=None) is Action.RESUME


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (DownloadError("503"), True),
        (requests.ConnectionError(), True),
        (requests.Timeout(), True),
        (PermanentDownloadError("404"), False),
        (VerificationError("size"), False),
        (ValueError("bug"), False),
    ],
    ids=["5xx", "connection", "timeout", "4xx", "verification", "other"],
)
def test_only_transient_errors_are_retried(error, transient):
    assert is_transient(error) is transient


def test_a_server_sending_far_more_than_expected_is_stopped_and_the_part_deleted(file_server, tmp_path):
    big = 64 << 20
    (file_server.root / NAME).write_bytes(bytes(big))
    file_server.add_faults(NAME, Fault(no_length=True))  # no size announced: only the bytes themselves tell
    with pytest.raises(VerificationError, match=r"sent more than the 1,000,000 bytes expected; stopped and deleted"):
        fetch(file_server, tmp_path, expected_bytes=1_000_000, retries=0)
    assert not (tmp_path / (NAME + ".part")).exists()
    assert file_server.body_bytes_sent(NAME) < big // 2  # the client hung up long before the end


def test_an_announced_size_over_the_expected_is_refused_before_the_body(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    with pytest.raises(VerificationError, match=r"offers 300,000 bytes, more than the 1,000 expected"):
        fetch(file_server, tmp_path, expected_bytes=1_000, retries=3)
    assert len(file_server.requests_for(NAME)) == 1  # not retried: retrying cannot make it smaller
    assert not (tmp_path / (NAME + ".part")).exists()


def test_a_stalled_server_ends_the_attempt_after_the_read_timeout_and_the_part_is_kept(file_server, tmp_path):
    file_server.put(NAME, CONTENT)
    file_server.add_faults(NAME, Fault(stall_after=1000, stall_seconds=5), Fault(stall_after=1000, stall_seconds=5))
    with pytest.raises(DownloadError, match=r"still failing after 2 attempts .*stalled.*rerun to resume"):
        fetch(file_server, tmp_path, retries=1, read_timeout=0.2)
    assert (tmp_path / (NAME + ".part")).stat().st_size == 2000  # the second attempt resumed at 1,000, then stalled too
    assert fetch(file_server, tmp_path).read_bytes() == CONTENT


@pytest.mark.parametrize(
    ("target", "message"),
    [("/notMNIST_small.tar.gz", r"more than 30 redirects \(a redirect loop\?\); check the URL\.$"),
     ("file:///etc/passwd", r"redirected to an address this client does not fetch .*give its path")],
    ids=["redirect-loop", "redirect-to-file"],
)
def test_redirects_that_cannot_end_well_are_one_line_errors(file_server, tmp_path, target, message):
    file_server.put(NAME, CONTENT)
    file_server.add_faults(NAME, *[Fault(redirect_to=target)] * 40)
    with pytest.raises(PermanentDownloadError, match=message):
        fetch(file_server, tmp_path, retries=2)
