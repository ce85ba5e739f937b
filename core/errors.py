"""Project exceptions: each names what went wrong and what the user can do about it. Every layer may raise them."""


class PipelineError(Exception):
    """A stage failed for a reason the user can act on; the message says how."""


class DownloadError(PipelineError):
    """A transfer failed in a way that may succeed on a retry (network, 5xx, 408, 429)."""


class PermanentDownloadError(PipelineError):
    """A transfer that retrying cannot fix: 4xx answers, bad URLs, a file that fails verification."""


class VerificationError(PermanentDownloadError):
    """A complete file whose size or sha256 differs from what was expected."""


class UnsafeArchiveError(PipelineError):
    """An archive member that could write outside the destination, or an archive past its limits."""


class ArchiveError(PipelineError):
    """An archive that is corrupt, truncated, or not laid out as expected."""


class CorruptDataError(PipelineError):
    """Data on disk that differs from what was recorded when it was written (a damaged or overwritten file)."""


class DiskFullError(PipelineError):
    """No room left on a file system for what a stage writes."""


class RunCancelledError(PipelineError):
    """A run stopped by Ctrl-C, the UI or `prefect flow-run cancel`; it published nothing after the cancel."""
