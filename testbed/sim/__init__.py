"""The simulator: PMs, VMs, workloads and migrations on simulated time, for scale studies.

Never a default and never mistaken for a measurement: every output (manifest, run details, a
SIMULATED file beside the CSV tables, figure titles, CLI lines) says SIMULATED. Parameters come
from a calibration file (`testbed calibrate DIR` fits one from a real campaign).
"""
