"""Running experiments: layouts (where VMs start), campaigns (which runs, in which order, resumed
after a crash) and the executor protocol the lab side implements."""
