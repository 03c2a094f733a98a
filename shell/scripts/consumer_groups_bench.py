#!/usr/bin/env python3
"""Consumer groups with real processes (BENCHMARKS.md): N members started together on a backlog,
and a member restarted after Ctrl-C or SIGKILL. Needs a running `holdfast cluster`."""
import subprocess, time, os, signal, sys, collections, re, tempfile
H=os.environ.get("HOLDFAST", "./target/release/holdfast")
env=dict(os.environ)  # HOLDFAST_SERVERS, or the local cluster's default addresses
def run(*a, **k): return subprocess.run([H,*a],env=env,capture_output=True,**k)
def produce(topic, n, prefix):
    data="".join(f"{prefix}-{i}\n" for i in range(n)).encode()
    t0=time.time(); r=run("produce",topic,input=data); assert r.returncode==0, r.stderr
    return time.time()-t0
BACKLOG=int(sys.argv[1]) if len(sys.argv)>1 else 100000
for n in [2,4,8]:
    topic=f"s{n}"
    run("topic","create",topic,"--queues","8")
    tp=produce(topic,BACKLOG,"m")
    t0=time.time()
    # Each member writes to its own file: read one pipe after another and the members not
    # being read block on a full pipe (64 KiB, about 8,400 lines) inside their listener, stop
    # heartbeating, and keep their queues until their session expires. (The first version of
    # this script did that, and measured its own stall.)
    outs=[tempfile.TemporaryFile() for _ in range(n)]; errs=[tempfile.TemporaryFile() for _ in range(n)]
    ps=[subprocess.Popen([H,"consume",topic,"--group",f"g{n}","--timeout","5"],env=env,stdout=o,stderr=e) for o,e in zip(outs,errs)]
    c=collections.Counter(); per=[]; redel=0
    for p,o,e in zip(ps,outs,errs):
        p.wait(); o.seek(0); e.seek(0)
        lines=o.read().decode().splitlines(); c.update(lines); per.append(len(lines))
        m=re.search(r"(\d+) of them redelivered", e.read().decode()); redel+=int(m.group(1)) if m else 0
    wall=time.time()-t0-5
    twice=sum(v-1 for v in c.values())
    print(f"{n} members, backlog {BACKLOG} (produced in {tp:.1f}s): unique {len(c)}, printed twice {twice}, broker redeliveries {redel} ({100*redel/BACKLOG:.2f}%), per member {per}, drained in {wall:.1f}s")
# restart after Ctrl-C, and after SIGKILL
for how in ["INT","KILL"]:
    topic=f"r{how}"
    run("topic","create",topic,"--queues","8")
    N=20000; produce(topic,N,"r")
    a=subprocess.Popen([H,"consume",topic,"--group","g","--timeout","30"],env=env,stdout=subprocess.PIPE,stderr=subprocess.PIPE)
    time.sleep(0.5)
    a.send_signal(getattr(signal,"SIG"+how))
    out,_=a.communicate(); got=len(out.decode().splitlines())
    t0=time.time()
    b=subprocess.run([H,"consume",topic,"--group","g","--timeout","20","--count",str(N-got)],env=env,capture_output=True)
    lines=b.stdout.decode().splitlines()
    print(f"SIG{how} after {got} printed: the restarted member printed {len(lines)} (of {N-got} left, {len(set(lines)|set(out.decode().splitlines()))} unique overall) in {time.time()-t0:.1f}s; {b.stderr.decode().strip()}")
