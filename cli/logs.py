"""Logging for the `attnc` command: attnc's own log on stderr (rich), and the libraries' loggers
(torch, onnxscript, transformers, Python warnings) taken off the terminal into attnc's debug log."""

from __future__ import annotations

import logging
import os

from rich.console import Console


def setup_logging(verbose: bool, debug: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if debug else (logging.INFO if verbose else logging.WARNING)
    logger = logging.getLogger("attnc")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.addHandler(RichHandler(console=Console(stderr=True), show_path=False, show_time=False))
    logger.setLevel(level)
    logger.propagate = False
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not debug else logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # Python warnings go to the log (shown with --debug), never straight to the terminal
    logging.captureWarnings(True)
    _route_to_log("py.warnings", debug)
    if not debug:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass


class _ToAttncLog(logging.Handler):
    """Forwards another library's records into attnc's debug log (tracebacks included)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.INFO:  # a library's own debug chatter (atexit stats)
            return
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad record must not break the command
            text = str(record.msg)
        logging.getLogger("attnc.lib").debug("%s: %s", record.name, text)


def _route_to_log(top: str, debug: bool) -> None:
    """Take `top`'s loggers off the terminal: drop the stderr handlers a library installed on it
    and its children (torch._logging does, at import), and forward everything into attnc's log,
    which the console shows only with --debug."""
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger) or not (name == top or name.startswith(top + ".")):
            continue
        streams = [h for h in lg.handlers if type(h) is logging.StreamHandler]
        for h in streams:
            lg.removeHandler(h)
        if streams and name != top:
            lg.propagate = True
    root = logging.getLogger(top)
    for h in [h for h in root.handlers if isinstance(h, (_ToAttncLog, logging.StreamHandler))]:
        root.removeHandler(h)
    root.addHandler(_ToAttncLog())
    root.propagate = False
    root.setLevel(logging.INFO if debug else logging.WARNING)


def route_library_logs(debug: bool) -> None:
    import torch  # noqa: F401 - torch._logging puts its stderr handlers in place on import

    for top in ("torch", "onnxscript", "onnx_ir", "transformers"):
        _route_to_log(top, debug)

