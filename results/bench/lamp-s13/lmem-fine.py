import time, sys
pid = sys.argv[1]; out = open("/tmp/lmem/full/fine.log", "a", buffering=1)
hwm0 = 0; sec = None; mx = 0; mn = 1e9
while True:
    try:
        st = open(f"/proc/{pid}/status").read()
    except OSError:
        break
    v = {l.split(":")[0]: int(l.split()[1]) for l in st.splitlines() if l.startswith(("VmRSS", "VmHWM"))}
    r, h = v["VmRSS"] // 1024, v["VmHWM"] // 1024
    now = time.strftime("%H:%M:%S", time.gmtime())
    if now != sec:
        if sec is not None:
            out.write(f"{sec} rss_min {mn} rss_max {mx} hwm {h}\n")
        sec, mx, mn = now, r, r
    mx, mn = max(mx, r), min(mn, r)
    if h != hwm0:
        out.write(f"{now} HWM {hwm0} -> {h} (rss now {r})\n"); hwm0 = h
    time.sleep(0.02)
