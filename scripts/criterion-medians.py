#!/usr/bin/env python3
"""Runs criterion bench binaries in turn, ROUNDS times, and prints each benchmark's median over the rounds.

Usage: scripts/criterion-medians.py ROUNDS FILTER BINARY [BINARY...]
With two binaries (before, after) it also prints after/before. Build a binary with
`cargo bench -p nodedb-mem-benches --bench reserve --no-run` and take the path cargo prints.
"""
import collections
import re
import statistics
import subprocess
import sys

rounds=int(sys.argv[1]); filt=sys.argv[2]; bins=sys.argv[3:]
res=collections.defaultdict(lambda: collections.defaultdict(list))
for r in range(rounds):
    for i,b in enumerate(bins):
        out=subprocess.run([b,'--bench','--warm-up-time','1','--measurement-time','2','--noplot',filt],capture_output=True,text=True).stdout
        name=None
        for line in out.splitlines():
            m=re.match(r'^(\S+/\S+)',line)
            if m and not line.startswith(' '): name=m.group(1)
            m=re.search(r'time:\s+\[([\d.]+) (\S+) ([\d.]+) (\S+) ([\d.]+) (\S+)\]',line)
            if m and name:
                v=float(m.group(3)); u=m.group(4)
                v*= {'ps':1e-3,'ns':1,'µs':1e3,'us':1e3,'ms':1e6}[u]
                res[name][i].append(v); name=None
for name,d in res.items():
    meds=[statistics.median(d[i]) for i in range(len(bins))]
    print(name, ' '.join(f'{m:.1f}' for m in meds), ' ratio %.3f'%(meds[-1]/meds[0]) if len(bins)>1 else '', d)
