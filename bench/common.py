"""Helpers shared by the benchmarks: summary statistics and the peak memory of this process."""
import resource
import statistics


def stats(xs, nd=2):
    """median, min, max of xs, rounded to nd digits."""
    return dict(median=round(statistics.median(xs), nd), min=round(min(xs), nd), max=round(max(xs), nd))


def peak_mib():
    """Peak resident memory of this process in MiB: VmHWM where Linux has it (ru_maxrss of a child would include
    its parent's resident memory at fork time: Linux carries it across fork and exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return round(int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1]) / 1024)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
