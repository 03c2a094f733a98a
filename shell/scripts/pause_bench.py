#!/usr/bin/env python3
"""A server node paused (SIGSTOP, like a long GC pause) under consumer load (BENCHMARKS.md):
counts messages printed twice by a 2-member group. Needs a running `holdfast cluster`; the
paused node is the leader of broker group 1, found from `holdfast status`, by the pid the
cluster's banner printed (CLUSTER_LOG names the banner's file)."""
import subprocess, time, os, signal, sys, collections, re, tempfile
H=os.environ.get("HOLDFAST", "./target/release/holdfast")
LOG=os.environ.get("CLUSTER_LOG", "cluster.log")
N=int(sys.argv[1]) if len(sys.argv)>1 else 200000
PAUSE=float(sys.argv[2]) if len(sys.argv)>2 else 15
pids={int(n):int(p) for n,p in re.findall(r"node (\d+) clients on \S+, peers on \S+\s+\(pid (\d+)", open(LOG).read())}
def run(*a, **k): return subprocess.run([H,*a],capture_output=True,**k)
topic=f"pause{int(time.time())}"
run("topic","create",topic,"--queues","8")
data="".join(f"p-{i}\n" for i in range(N)).encode()
assert run("produce",topic,input=data).returncode==0
leader=None; node=None
for line in run("status").stdout.decode().splitlines():
    m=re.match(r"node (\d+) ", line)
    if m: node=int(m.group(1))
    if re.match(r"\s+group 1\s+Leader", line): leader=node
outs=[tempfile.TemporaryFile() for _ in range(2)]; errs=[tempfile.TemporaryFile() for _ in range(2)]
ps=[subprocess.Popen([H,"consume",topic,"--group","pg","--timeout","30"],stdout=o,stderr=e) for o,e in zip(outs,errs)]
time.sleep(0.3)
print(f"pausing node {leader} (pid {pids[leader]}, leader of group 1) for {PAUSE} s")
os.kill(pids[leader], signal.SIGSTOP); time.sleep(PAUSE); os.kill(pids[leader], signal.SIGCONT)
c=collections.Counter(); per=[]; redel=0
for p,o,e in zip(ps,outs,errs):
    p.wait(); o.seek(0); e.seek(0)
    lines=o.read().decode().splitlines(); c.update(lines); per.append(len(lines))
    m=re.search(r"(\d+) of them redelivered", e.read().decode()); redel+=int(m.group(1)) if m else 0
print(f"{N} messages, node paused {PAUSE} s: unique {len(c)}, printed twice {sum(v-1 for v in c.values())}, broker redeliveries {redel}, per member {per}")
