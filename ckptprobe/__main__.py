from ckptprobe.cli import run

run()
