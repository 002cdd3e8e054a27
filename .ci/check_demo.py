"""CI: the demo must reach the accuracy the README states (>= 0.99 test accuracy on each task)."""
import glob
import json
import os
import sys

BAR = 0.99
runs = sorted(glob.glob("runs/demo-*/results.json"), key=os.path.getmtime)
if not runs:
    sys.exit("check_demo: no runs/demo-*/results.json: 'make demo' did not finish a run")
per_task = json.load(open(runs[-1]))["test"]["per_task"]
low = {task: acc for task, acc in per_task.items() if acc < BAR}
print(f"check_demo: {runs[-1]}: " + ", ".join(f"{t} {a:.4f}" for t, a in per_task.items()))
if low:
    sys.exit(f"check_demo: below the README's bar of {BAR}: {low}")
