# yaml2flat.awk - flatten the block-style YAML subset used by cloud-init
# seeds into "path<TAB>value" lines, for the tiny guest (busybox awk).
#
#   hostname: foo                 -> hostname	foo
#   users:                        -> users.0.name	vm
#     - name: vm                     users.0.ssh_authorized_keys.0	ssh-ed25519 ...
#       ssh_authorized_keys: [a]
#   ssh_keys:
#     ed25519_private: |          -> ssh_keys.ed25519_private	line1\nline2\n
#
# Supported: nested block mappings and sequences (sequence items indented or
# at the same column as their key), "- key: value" items, flow sequences of
# plain/quoted scalars on one line ([a, "b"]), single/double quoted scalars,
# literal/folded block scalars (| |- > >-, folded treated as literal).
# Newlines in values are written as the two characters \n.

function unquote(s,    q) {
    sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s)
    q = substr(s, 1, 1)
    if ((q == "\"" || q == "'") && length(s) >= 2 && substr(s, length(s), 1) == q) {
        s = substr(s, 2, length(s) - 2)
        if (q == "\"") { gsub(/\\"/, "\"", s); gsub(/\\\\/, "\\", s) }
        else gsub(/''/, "'", s)
    }
    return s
}
function join(p, k) { return (p == "") ? k : p "." k }
function emit(p, v) { printf "%s\t%s\n", p, v }
function push(ind, p, kind) { sp++; sind[sp] = ind; spath[sp] = p; skind[sp] = kind; sidx[sp] = -1 }
function flow(p, v,    n, i, parts) {
    v = substr(v, 2); sub(/\][ \t]*$/, "", v)
    if (v ~ /^[ \t]*$/) return
    n = split(v, parts, ",")
    for (i = 1; i <= n; i++) emit(join(p, i - 1), unquote(parts[i]))
}
# Handle "key: value" (or a bare scalar when iskey is 0) at column ind.
function mapline(ind, c, base,    key, val, pos) {
    if (match(c, /^("[^"]*"|'[^']*'|[^:]+):([ \t]|$)/)) {
        key = unquote(substr(c, 1, RLENGTH - 1))
        sub(/:[ \t]*$/, "", key); key = unquote(key)
        val = substr(c, RLENGTH + 1)
        sub(/^[ \t]+/, "", val); sub(/[ \t]+$/, "", val)
        p = join(base, key)
        if (val == "") { pending = 1; ppath = p; pind = ind }
        else if (val ~ /^[|>][-+0-9]*$/) { blk = 1; bpath = p; bparent = ind; bind = -1; bval = "" }
        else if (val ~ /^\[/) flow(p, val)
        else emit(p, unquote(val))
        return 1
    }
    return 0
}
BEGIN { sp = 0; push(-1, "", "map"); pending = 0; blk = 0 }
{
    line = $0
    sub(/\r$/, "", line)
    if (NR == 1 && line ~ /^#/) next
    match(line, /^ */); ind = RLENGTH
    c = substr(line, ind + 1)
    if (blk) {
        if (c == "" || ind > bparent) {
            if (c != "" && bind < 0) bind = ind
            s = (bind >= 0 && length(line) >= bind) ? substr(line, bind + 1) : ""
            bval = bval s "\\n"
            next
        }
        emit(bpath, bval); blk = 0
    }
    if (c == "" || c ~ /^#/ || c == "---" || c == "...") next
    if (pending) {
        pending = 0
        if ((c ~ /^-( |$)/) && ind >= pind) push(ind, ppath, "seq")
        else if (ind > pind) push(ind, ppath, "map")
    }
    while (sp > 1 && (sind[sp] > ind || (sind[sp] == ind && skind[sp] == "seq" && c !~ /^-( |$)/))) sp--
    if (c ~ /^-( |$)/) {
        if (skind[sp] != "seq") next
        sidx[sp]++
        ip = join(spath[sp], sidx[sp])
        item = substr(c, 2)
        match(item, /^ */); off = RLENGTH
        item = substr(item, off + 1)
        if (item == "") { pending = 1; ppath = ip; pind = ind; next }
        if (item ~ /^[|>][-+0-9]*$/) { blk = 1; bpath = ip; bparent = ind; bind = -1; bval = ""; next }
        if (item ~ /^\[/) { flow(ip, item); next }
        if (item !~ /^["']/ && item ~ /^[^:]+:([ \t]|$)/ || item ~ /^("[^"]*"|'[^']*'):([ \t]|$)/) {
            push(ind + 1 + off, ip, "map")
            mapline(ind + 1 + off, item, ip)
        } else emit(ip, unquote(item))
        next
    }
    mapline(ind, c, spath[sp])
}
END { if (blk) emit(bpath, bval) }
