"""fph-capacity: capacity planning experiments for fph (issue 5).

Modules:
  cgroup   memory cgroup v1/v2: create, limit, attach, usage, OOM kills, remove
  fit      pure logic: did a guest fit? (exit status, OOM events, guest events)
  report   pure logic: CSV, Markdown summary, gnuplot script
  runner   orchestration: fphd, guests, sampling
"""
