"""A one-line progress bar with ETA for the console log."""
from __future__ import annotations


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def progress_bar(done: int, total: int, elapsed: float, width: int = 20) -> str:
    """`[#####-----] 50/100 elapsed 01:00 ETA 01:00`; the ETA extrapolates the mean step time so far."""
    frac = done / max(total, 1)
    filled = int(width * frac)
    eta = elapsed / done * (total - done) if done else 0.0
    return (f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} "
            f"elapsed {format_duration(elapsed)} ETA {format_duration(eta)}")
