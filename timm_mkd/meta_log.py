"""CSV log of the temperature trajectory: one row per meta step.

The learned temperatures are MKD's whole point, and a run's ``summary.csv`` (one row per epoch)
hides how they move between meta steps. ``TemperatureLog`` appends every meta step to
``OUTPUT_DIR/temperatures.csv`` so ``python -m timm_mkd.plot OUTPUT_DIR`` can draw it, during
the run or after it.
"""
import math
import numbers
import os
from typing import Any, Mapping, Optional

__all__ = ['CSV_NAME', 'COLUMNS', 'TemperatureLog']

CSV_NAME = 'temperatures.csv'
COLUMNS = ('step', 'epoch', 'tau_t', 'tau_s', 'meta_loss', 'hypergrad_t', 'hypergrad_s', 'skipped')


def _format(value: Any) -> str:
    """One CSV cell: blank for None, 0/1 for bools, full precision for floats and 0-d tensors."""
    if value is None:
        return ''
    if hasattr(value, 'item') and callable(value.item):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, bool):
        return '1' if value else '0'
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        return repr(value) if math.isfinite(value) else str(value)  # 'nan', 'inf', '-inf'
    text = str(value)
    if any(c in text for c in ',"\n\r'):
        raise ValueError(f'cannot write {text!r} to the temperature log: it is not a plain value')
    return text


class TemperatureLog:
    """Append-only CSV of meta steps: ``step,epoch,tau_t,tau_s,meta_loss,hypergrad_t,hypergrad_s,skipped``.

    Crash safety: every row is written with one ``write`` and flushed at once, so a killed run
    loses at most the row being written. On open, an existing file is appended to (resume keeps
    its header); a torn last line left by a kill is cut off first, so the file stays parseable.
    A file whose header differs is refused instead of being mixed with another format.

    Only the primary rank should write: build it with ``enabled=is_primary(args)``; a disabled
    log touches no file and ``record`` does nothing.

    On resume from an earlier checkpoint the log keeps the rows written after that checkpoint,
    so a step may appear twice; readers (``timm_mkd.plot``) keep the last row of each step.

    Args:
        path: The CSV file (use ``TemperatureLog.in_dir(output_dir)`` for ``temperatures.csv``).
        enabled: Write the file (True on the primary rank only).
    """

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._file = None
        if enabled:
            self._open()

    @classmethod
    def in_dir(cls, output_dir: str, enabled: bool = True) -> 'TemperatureLog':
        """The log at ``output_dir/temperatures.csv`` (the folder train.py writes its summary to)."""
        return cls(os.path.join(output_dir, CSV_NAME), enabled=enabled)

    def _open(self) -> None:
        header = ','.join(COLUMNS)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        existing = os.path.isfile(self.path) and os.path.getsize(self.path) > 0
        if existing:
            self._repair_and_check(header)
        self._file = open(self.path, 'a', newline='')
        if not existing:
            self._file.write(header + '\n')
            self._file.flush()

    def _repair_and_check(self, header: str) -> None:
        with open(self.path, 'rb+') as f:
            data = f.read()
            if not data.endswith(b'\n'):  # torn last row (killed mid-write): drop it
                f.truncate(data.rfind(b'\n') + 1)
                data = data[:data.rfind(b'\n') + 1]
        first = data.split(b'\n', 1)[0].decode('utf-8', errors='replace').strip()
        if not data:
            # only a torn header was there: start over
            with open(self.path, 'w', newline='') as f:
                f.write(header + '\n')
            return
        if first != header:
            raise ValueError(
                f'{self.path} exists with header {first!r}, expected {header!r}; move it away or use '
                f'another output folder')

    def record(self, row: Mapping[str, Any]) -> None:
        """Append one meta step. Keys must be among ``COLUMNS``; missing ones stay blank.

        Args:
            row: e.g. ``{'step': 120, 'epoch': 3, 'tau_t': 3.91, 'tau_s': 4.02, 'meta_loss': 0.61,
                'hypergrad_t': -0.012, 'hypergrad_s': 0.004, 'skipped': False}``; tensors are
                read with ``.item()``.
        """
        if not self.enabled:
            return
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ValueError(f'unknown temperature log column(s) {unknown}; columns are {list(COLUMNS)}')
        if self._file is None:
            raise ValueError(f'temperature log {self.path} is closed')
        line = ','.join(_format(row.get(name)) for name in COLUMNS) + '\n'
        self._file.write(line)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> 'TemperatureLog':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
