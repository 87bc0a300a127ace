-- The operations of the tidefs Redis engine, run server-side: each call of this script is one
-- filesystem operation, atomic because Redis runs a script without interleaving other commands.
-- Redis does not roll a script back, so every operation checks everything that can fail before
-- it writes anything.
--
-- Call: FCALL tidefs_<hash> 0 <op> <now sec> <now nsec> <trash hour name> <op arguments...>
-- (or EVALSHA <sha> 0 ... on servers without functions, before Redis 7).
-- Errors are replies whose message is an errno name ("ENOENT"); "retry <ino>" asks the caller
-- whether inode <ino> is open and to call again with the answer.
--
-- Inode numbers stay strings here: Lua numbers are doubles, exact only below 2^53.

local CHUNK = 67108864
local NAME_MAX = 255
local LINK_MAX = 65000
local S_ISGID = 1024
local ROOT = '1'
local TRASH = '@TRASH_INO@'
local FILE, DIR, SYMLINK = 1, 2, 3

local function fail(code) error({ err = code }) end
-- An integer as Redis wants it: never "-0", never in exponent form.
local function int(n) return string.format('%.0f', n + 0) end

-- Inodes: "i<ino>" holds "kind,mode,uid,gid,rdev,nlink,length,atime s,ns,mtime s,ns,ctime s,ns,parent".
local function decode(ino, v)
  local f = {}
  for x in string.gmatch(v, '[^,]+') do f[#f + 1] = x end
  return {
    ino = ino, kind = tonumber(f[1]), mode = tonumber(f[2]), uid = f[3], gid = f[4], rdev = f[5],
    nlink = tonumber(f[6]), length = tonumber(f[7]), as = f[8], an = f[9], ms = f[10], mn = f[11],
    cs = f[12], cn = f[13], parent = f[14],
  }
end

local function encode(a)
  return table.concat({ int(a.kind), int(a.mode), a.uid, a.gid, a.rdev, int(a.nlink),
    int(a.length), a.as, a.an, a.ms, a.mn, a.cs, a.cn, a.parent }, ',')
end

local function node(ino)
  local v = redis.call('GET', 'i' .. ino)
  if not v then return nil end
  return decode(ino, v)
end

local function must_node(ino)
  local a = node(ino)
  if not a then fail('ENOENT') end
  return a
end

local function must_dir(ino)
  local a = must_node(ino)
  if a.kind ~= DIR then fail('ENOTDIR') end
  return a
end

local function put(a) redis.call('SET', 'i' .. a.ino, encode(a)) end
local function attr_reply(a) return { a.ino, encode(a) } end

local function touch(d, now)
  d.ms, d.mn, d.cs, d.cn = now.s, now.n, now.s, now.n
  put(d)
end

-- Counters and settings.
local function bump(name, delta) return redis.call('HINCRBY', 'counter', name, int(delta)) end
local function counter(name) return tonumber(redis.call('HGET', 'counter', name) or '0') end

local function limits()
  local v = redis.call('HMGET', 'setting', 'capacity', 'inodes', 'trash_days')
  return tonumber(v[1] or '0'), tonumber(v[2] or '0'), tonumber(v[3] or '0')
end

local function round_space(len) return math.ceil(len / 4096) * 4096 end

local function check_space(delta)
  local capacity = limits()
  if delta > 0 and capacity > 0 and counter('used_space') + delta > capacity then
    fail('ENOSPC')
  end
end

-- Entries: "d<dir>" maps name -> "ino,kind,cookie"; "z<dir>" orders names by cookie.
local function edge(dir, name)
  local v = redis.call('HGET', 'd' .. dir, name)
  if not v then return nil end
  local ino, kind = string.match(v, '^([^,]+),([^,]+)')
  return ino, tonumber(kind)
end

local function add_edge(dir, name, ino, kind)
  local cookie = bump('next_edge', 1)
  redis.call('HSET', 'd' .. dir, name, ino .. ',' .. int(kind) .. ',' .. int(cookie))
  redis.call('ZADD', 'z' .. dir, cookie, name)
end

local function set_edge(dir, name, ino, kind)
  local cookie = string.match(redis.call('HGET', 'd' .. dir, name), ',([^,]+)$')
  redis.call('HSET', 'd' .. dir, name, ino .. ',' .. int(kind) .. ',' .. cookie)
end

local function remove_edge(dir, name)
  redis.call('HDEL', 'd' .. dir, name)
  redis.call('ZREM', 'z' .. dir, name)
end

local function dir_empty(ino) return redis.call('HLEN', 'd' .. ino) == 0 end

local function reserved(parent, name)
  return parent == ROOT and (name == '.trash' or name == '.control')
end

local function in_trash(dir) return dir.ino == TRASH or dir.parent == TRASH end

-- Slices: "c<ino>:<chunk>" lists "id,size,off,len,pos" in commit order; "k<ino>" is the set of
-- chunks with a list. "refs" scores "id:size:ino" by id for every slice with data; "freed"
-- scores "id:size" by id for slices whose objects are to delete.
local function slices_of(ino, chunk)
  local out = {}
  for i, v in ipairs(redis.call('LRANGE', 'c' .. ino .. ':' .. chunk, 0, -1)) do
    local id, size, off, len, pos = string.match(v, '^(%d+),(%d+),(%d+),(%d+),(%d+)$')
    out[i] = { id = id, size = tonumber(size), off = tonumber(off), len = tonumber(len),
      pos = tonumber(pos) }
  end
  return out
end

local function slice_str(s)
  return s.id .. ',' .. int(s.size) .. ',' .. int(s.off) .. ',' .. int(s.len) .. ',' .. int(s.pos)
end

local function store_slices(ino, chunk, list)
  local key = 'c' .. ino .. ':' .. chunk
  redis.call('DEL', key)
  if #list == 0 then
    redis.call('SREM', 'k' .. ino, chunk)
    return
  end
  local vals = {}
  for i, s in ipairs(list) do vals[i] = slice_str(s) end
  for i = 1, #vals, 1000 do
    redis.call('RPUSH', key, unpack(vals, i, math.min(i + 999, #vals)))
  end
  redis.call('SADD', 'k' .. ino, chunk)
end

local function append_slice(ino, chunk, s)
  redis.call('RPUSH', 'c' .. ino .. ':' .. chunk, slice_str(s))
  redis.call('SADD', 'k' .. ino, chunk)
  if s.size > 0 then
    redis.call('ZADD', 'refs', s.id, s.id .. ':' .. int(s.size) .. ':' .. ino)
  end
end

local function queue_free(id, size)
  if size > 0 then redis.call('ZADD', 'freed', id, id .. ':' .. int(size)) end
end

-- Slice `s` of `ino` is dropped: if no other file references it (a packed slice is shared by
-- several), its objects go to the deletion queue.
local function free_slice(ino, s)
  if s.size > 0 then
    redis.call('ZREM', 'refs', s.id .. ':' .. int(s.size) .. ':' .. ino)
    if #redis.call('ZRANGEBYSCORE', 'refs', s.id, s.id, 'LIMIT', 0, 1) == 0 then
      queue_free(s.id, s.size)
    end
  end
end

-- Drops the slices of a chunk that later slices hide entirely.
local function drop_hidden(ino, chunk)
  local list = slices_of(ino, chunk)
  local covered, keep, dropped = {}, {}, false
  for i = #list, 1, -1 do
    local s = list[i]
    local st, en = s.pos, s.pos + s.len
    local at = 1
    while covered[at] and covered[at][2] < st do at = at + 1 end
    local c = covered[at]
    if c and c[1] <= st and en <= c[2] then
      free_slice(ino, s)
      dropped = true
    else
      table.insert(keep, 1, s)
      local ms, me, last = st, en, at
      while covered[last] and covered[last][1] <= en do
        ms = math.min(ms, covered[last][1])
        me = math.max(me, covered[last][2])
        last = last + 1
      end
      for _ = at, last - 1 do table.remove(covered, at) end
      table.insert(covered, at, { ms, me })
    end
  end
  if dropped then store_slices(ino, chunk, keep) end
end

-- Moves every slice at or past `length` out of the file; one straddling it is cut short.
local function drop_slices_past(ino, length)
  local first = math.floor(length / CHUNK)
  local cut = length - first * CHUNK
  for _, c in ipairs(redis.call('SMEMBERS', 'k' .. ino)) do
    local chunk = tonumber(c)
    if chunk >= first then
      local keep, changed = {}, false
      for _, s in ipairs(slices_of(ino, c)) do
        if chunk > first or s.pos >= cut then
          free_slice(ino, s)
          changed = true
        else
          if s.pos + s.len > cut then
            s.len = cut - s.pos
            changed = true
          end
          keep[#keep + 1] = s
        end
      end
      if changed then store_slices(ino, c, keep) end
    end
  end
end

-- Deletes inode `a` and everything it owns; its slices go to the deletion queue.
local function free_inode(a)
  local ino = a.ino
  for _, c in ipairs(redis.call('SMEMBERS', 'k' .. ino)) do
    for _, s in ipairs(slices_of(ino, c)) do free_slice(ino, s) end
    redis.call('DEL', 'c' .. ino .. ':' .. c)
  end
  redis.call('DEL', 'k' .. ino, 'x' .. ino, 's' .. ino, 'i' .. ino, 'h' .. ino, 'd' .. ino,
    'z' .. ino, 'p' .. ino)
  redis.call('HDEL', 'trashed', ino)
  if a.kind == FILE then bump('used_space', -round_space(a.length)) end
  bump('used_inodes', -1)
end

-- Frees `ino` if nothing names (the trash included) or holds it any more.
local function free_if_orphan(ino)
  local a = node(ino)
  if a and a.nlink == 0 and redis.call('SCARD', 'h' .. ino) == 0
      and redis.call('HEXISTS', 'trashed', ino) == 0 then
    free_inode(a)
  end
end

-- The trash: root-owned 0700 directories, one per hour, holding files that lost their last name.
local function empty_dir(ino, parent, now)
  return { ino = ino, kind = DIR, mode = 448, uid = '0', gid = '0', rdev = '0', nlink = 2,
    length = 4096, as = now.s, an = now.n, ms = now.s, mn = now.n, cs = now.s, cn = now.n,
    parent = parent }
end

local function trash_hour_dir(now)
  local trash = node(TRASH)
  if not trash then
    trash = empty_dir(TRASH, ROOT, now)
    put(trash)
    bump('used_inodes', 1)
  end
  local existing = edge(TRASH, now.hour)
  if existing then return existing end
  local ino = int(bump('next_ino', 1) - 1)
  put(empty_dir(ino, TRASH, now))
  add_edge(TRASH, now.hour, ino, DIR)
  bump('used_inodes', 1)
  trash.nlink = trash.nlink + 1
  touch(trash, now)
  return ino
end

local function move_to_trash(t, parent, name, now)
  local hour = trash_hour_dir(now)
  local entry = string.sub(parent .. '-' .. t.ino .. '-' .. name, 1, NAME_MAX)
  local n = 1
  while edge(hour, entry) do
    local suffix = '~' .. n
    entry = string.sub(entry, 1, NAME_MAX - #suffix) .. suffix
    n = n + 1
  end
  add_edge(hour, entry, t.ino, t.kind)
  redis.call('HSET', 'trashed', t.ino, hour)
  t.parent = hour
  put(t)
end

local function trashing(dir)
  local _, _, days = limits()
  return days > 0 and not in_trash(dir)
end

-- Whether dropping one name of `t` needs to know if it is open: it is the last name and the
-- file does not go to the trash.
local function needs_open(t, trash)
  return t.nlink <= 1 and not (trash and t.kind == FILE)
end

-- Drops one name of non-directory `t`; see Meta::unlink.
local function unlink_inode(t, now, sid, open, trash, parent, name)
  t.nlink = math.max(t.nlink - 1, 0)
  t.cs, t.cn = now.s, now.n
  if t.nlink > 0 then return put(t) end
  if trash and t.kind == FILE then return move_to_trash(t, parent, name, now) end
  if open then
    put(t)
    redis.call('SADD', 'o' .. sid, t.ino)
    redis.call('SADD', 'h' .. t.ino, sid)
    return
  end
  free_inode(t)
end

local ops = {}

function ops.format(now, json, capacity, inodes, trash_days, uid, gid)
  if redis.call('HEXISTS', 'setting', 'format') == 1 then return 'exists' end
  redis.call('HSET', 'setting', 'format', json, 'capacity', capacity, 'inodes', inodes,
    'trash_days', trash_days)
  local root = empty_dir(ROOT, ROOT, now)
  root.mode, root.uid, root.gid = 511, uid, gid
  put(root)
  redis.call('HSET', 'counter', 'next_ino', 2, 'next_slice', 1, 'used_space', 0,
    'used_inodes', 1)
  return 'ok'
end

-- POSIX locks: "p<ino>" holds "lock;lock;..." (see lock.rs); "L<sid>" is the set of inodes
-- where session `sid` may hold locks. The engine decides the new list and swaps it in only
-- if the stored one is still `old`.
function ops.lock_swap(now, ino, sid, old, new)
  if (redis.call('GET', 'p' .. ino) or '') ~= old then return 0 end
  if new == '' then
    redis.call('DEL', 'p' .. ino)
  else
    redis.call('SET', 'p' .. ino, new)
    redis.call('SADD', 'L' .. sid, ino)
  end
  return 1
end

-- Drops every lock of session `sid`.
local function release_locks(sid)
  local prefix = sid .. ','
  for _, ino in ipairs(redis.call('SMEMBERS', 'L' .. sid)) do
    local raw = redis.call('GET', 'p' .. ino)
    if raw then
      local keep = {}
      for l in string.gmatch(raw, '[^;]+') do
        if string.sub(l, 1, #prefix) ~= prefix then keep[#keep + 1] = l end
      end
      if #keep == 0 then
        redis.call('DEL', 'p' .. ino)
      else
        redis.call('SET', 'p' .. ino, table.concat(keep, ';'))
      end
    end
  end
  redis.call('DEL', 'L' .. sid)
end

function ops.close_session(now, sid)
  release_locks(sid)
  for _, ino in ipairs(redis.call('SMEMBERS', 'o' .. sid)) do
    redis.call('SREM', 'h' .. ino, sid)
    free_if_orphan(ino)
  end
  redis.call('DEL', 'o' .. sid)
  redis.call('HDEL', 'sessions', sid)
  redis.call('ZREM', 'heartbeats', sid)
  return 'ok'
end

function ops.lookup(now, parent, name)
  local dir = must_dir(parent)
  if name == '.' then return attr_reply(dir) end
  if name == '..' then return attr_reply(must_node(dir.parent)) end
  local ino = edge(parent, name)
  if ino then return attr_reply(must_node(ino)) end
  if parent == ROOT and name == '.trash' then return attr_reply(must_node(TRASH)) end
  fail('ENOENT')
end

function ops.setattr(now, ino, mode, uid, gid, atime_s, atime_n, mtime_s, mtime_n, ctime_s, ctime_n)
  local a = must_node(ino)
  local changed = false
  if mode ~= '' then a.mode = bit.band(tonumber(mode), 4095); changed = true end
  if uid ~= '' then a.uid = uid; changed = true end
  if gid ~= '' then a.gid = gid; changed = true end
  if atime_s ~= '' then a.as, a.an = atime_s, atime_n; changed = true end
  if mtime_s ~= '' then a.ms, a.mn = mtime_s, mtime_n; changed = true end
  if ctime_s ~= '' then
    a.cs, a.cn = ctime_s, ctime_n
  elseif changed then
    a.cs, a.cn = now.s, now.n
  end
  put(a)
  return attr_reply(a)
end

function ops.truncate(now, ino, length, mtime_s, mtime_n)
  local a = must_node(ino)
  if a.kind == DIR then fail('EISDIR') end
  if a.kind ~= FILE then fail('EINVAL') end
  length = tonumber(length)
  local delta = round_space(length) - round_space(a.length)
  check_space(delta)
  if length < a.length then drop_slices_past(ino, length) end
  bump('used_space', delta)
  a.length = length
  a.ms, a.mn, a.cs, a.cn = mtime_s, mtime_n, mtime_s, mtime_n
  put(a)
  return attr_reply(a)
end

function ops.fallocate(now, ino, zero, keep_size, off, len, ...)
  local zero_ids = { ... }
  local a = must_node(ino)
  if a.kind == DIR then fail('EISDIR') end
  if a.kind ~= FILE then fail('EOPNOTSUPP') end
  off, len = tonumber(off), tonumber(len)
  local fin = off + len
  zero, keep_size = zero == '1', keep_size == '1'
  local grow = not keep_size and fin > a.length
  local delta = grow and (round_space(fin) - round_space(a.length)) or 0
  local pieces = {}
  if zero then
    local zero_end = keep_size and math.min(fin, a.length) or fin
    local at = off
    while at < zero_end do
      local chunk = math.floor(at / CHUNK)
      local pos = at - chunk * CHUNK
      local n = math.min(CHUNK - pos, zero_end - at)
      local id = zero_ids[#pieces + 1]
      if not id then fail('EINVAL') end
      pieces[#pieces + 1] = { chunk = chunk, s = { id = id, size = 0, off = 0, len = n, pos = pos } }
      at = at + n
    end
  end
  check_space(delta)
  for _, p in ipairs(pieces) do append_slice(ino, int(p.chunk), p.s) end
  if zero then a.ms, a.mn = now.s, now.n end
  if grow then
    bump('used_space', delta)
    a.length = fin
    a.ms, a.mn = now.s, now.n
  end
  a.cs, a.cn = now.s, now.n
  put(a)
  return attr_reply(a)
end

function ops.mknod(now, parent, name, kind, mode, uid, gid, rdev, has_target, target, groups)
  kind, mode = tonumber(kind), bit.band(tonumber(mode), 4095)
  local dir = must_dir(parent)
  if dir.nlink == 0 then fail('ENOENT') end
  if in_trash(dir) or reserved(parent, name) then fail('EPERM') end
  if edge(parent, name) then fail('EEXIST') end
  if kind == DIR and dir.nlink >= LINK_MAX then fail('EMLINK') end
  local _, max_inodes = limits()
  if max_inodes > 0 and counter('used_inodes') >= max_inodes then fail('ENOSPC') end
  local ino = int(bump('next_ino', 1) - 1)
  if bit.band(dir.mode, S_ISGID) ~= 0 then
    gid = dir.gid
    if kind == DIR then mode = bit.bor(mode, S_ISGID) end
  end
  if kind ~= DIR and bit.band(mode, S_ISGID) ~= 0 and uid ~= '0'
      and not string.find(',' .. groups .. ',', ',' .. gid .. ',', 1, true) then
    mode = bit.band(mode, bit.bnot(S_ISGID))
  end
  local length = 0
  if has_target == '1' then
    length = #target
  elseif kind == DIR then
    length = 4096
  end
  local a = { ino = ino, kind = kind, mode = mode, uid = uid, gid = gid, rdev = rdev,
    nlink = (kind == DIR) and 2 or 1, length = length, as = now.s, an = now.n, ms = now.s,
    mn = now.n, cs = now.s, cn = now.n, parent = parent }
  put(a)
  if has_target == '1' then redis.call('SET', 's' .. ino, target) end
  add_edge(parent, name, ino, kind)
  if kind == DIR then dir.nlink = dir.nlink + 1 end
  touch(dir, now)
  bump('used_inodes', 1)
  return { a.ino, encode(a), encode(dir) }
end

function ops.link(now, ino, parent, name)
  local dir = must_dir(parent)
  if dir.nlink == 0 then fail('ENOENT') end
  if in_trash(dir) or reserved(parent, name) then fail('EPERM') end
  local a = must_node(ino)
  if a.kind == DIR then fail('EPERM') end
  if a.nlink == 0 then fail('ENOENT') end
  if a.nlink >= LINK_MAX then fail('EMLINK') end
  if edge(parent, name) then fail('EEXIST') end
  add_edge(parent, name, ino, a.kind)
  a.nlink = a.nlink + 1
  a.cs, a.cn, a.parent = now.s, now.n, parent
  put(a)
  touch(dir, now)
  return attr_reply(a)
end

function ops.unlink(now, parent, name, sid, expect, open)
  local dir = must_dir(parent)
  local ino, kind = edge(parent, name)
  if not ino then fail('ENOENT') end
  if kind == DIR then fail('EISDIR') end
  local target = must_node(ino)
  local trash = trashing(dir)
  if needs_open(target, trash) and ino ~= expect then return 'retry ' .. ino end
  remove_edge(parent, name)
  if in_trash(dir) then redis.call('HDEL', 'trashed', ino) end
  touch(dir, now)
  unlink_inode(target, now, sid, open == '1', trash, parent, name)
  return 'ok'
end

function ops.rmdir(now, parent, name)
  local dir = must_dir(parent)
  local ino, kind = edge(parent, name)
  if not ino then fail('ENOENT') end
  if kind ~= DIR then fail('ENOTDIR') end
  if not dir_empty(ino) then fail('ENOTEMPTY') end
  remove_edge(parent, name)
  dir.nlink = math.max(dir.nlink - 1, 0)
  touch(dir, now)
  free_inode(must_node(ino))
  return 'ok'
end

-- Fails with EINVAL if `ino` is `from` or one of its ancestors.
local function check_not_ancestor(ino, from)
  local at = from
  while at ~= ROOT do
    if at == ino then fail('EINVAL') end
    at = must_node(at).parent
  end
end

function ops.rename(now, parent, name, new_parent, new_name, noreplace, exchange, sid, expect, open)
  noreplace, exchange = noreplace == '1', exchange == '1'
  local src_dir = must_dir(parent)
  local ino, kind = edge(parent, name)
  if not ino then fail('ENOENT') end
  local same_dir = parent == new_parent
  local dst_dir = same_dir and src_dir or must_dir(new_parent)
  if dst_dir.nlink == 0 then fail('ENOENT') end
  if in_trash(dst_dir) or src_dir.ino == TRASH or (exchange and in_trash(src_dir))
      or reserved(new_parent, new_name) then
    fail('EPERM')
  end
  local restoring = in_trash(src_dir)
  local dst_ino, dst_kind = edge(new_parent, new_name)
  if same_dir and name == new_name then
    if noreplace then fail('EEXIST') end
    return 'ok'
  end
  if not same_dir then
    check_not_ancestor(ino, new_parent)
    if exchange and dst_kind == DIR then check_not_ancestor(dst_ino, parent) end
  end
  local moved = must_node(ino)
  if exchange then
    if not dst_ino then fail('ENOENT') end
    local other = must_node(dst_ino)
    local src_links, dst_links = 0, 0
    if not same_dir then
      if kind == DIR and dst_kind ~= DIR then
        if dst_dir.nlink >= LINK_MAX then fail('EMLINK') end
        src_links, dst_links = -1, 1
      elseif kind ~= DIR and dst_kind == DIR then
        if src_dir.nlink >= LINK_MAX then fail('EMLINK') end
        src_links, dst_links = 1, -1
      end
    end
    set_edge(parent, name, dst_ino, dst_kind)
    set_edge(new_parent, new_name, ino, kind)
    src_dir.nlink = src_dir.nlink + src_links
    dst_dir.nlink = dst_dir.nlink + dst_links
    moved.parent, moved.cs, moved.cn = new_parent, now.s, now.n
    other.parent, other.cs, other.cn = parent, now.s, now.n
    put(moved)
    put(other)
  else
    local target
    if dst_ino then
      if noreplace then fail('EEXIST') end
      if dst_ino == ino then return 'ok' end
      if kind == DIR and dst_kind ~= DIR then fail('ENOTDIR') end
      if kind ~= DIR and dst_kind == DIR then fail('EISDIR') end
      if dst_kind == DIR and not dir_empty(dst_ino) then fail('ENOTEMPTY') end
      target = must_node(dst_ino)
    end
    local replaced_dir = target and dst_kind == DIR
    if kind == DIR and not same_dir then
      local links = dst_dir.nlink - (replaced_dir and 1 or 0)
      if links >= LINK_MAX then fail('EMLINK') end
    end
    local trash = target and not replaced_dir and trashing(dst_dir)
    if target and not replaced_dir and needs_open(target, trash) and dst_ino ~= expect then
      return 'retry ' .. dst_ino
    end
    if target then
      remove_edge(new_parent, new_name)
      if replaced_dir then
        dst_dir.nlink = dst_dir.nlink - 1
        free_inode(target)
      else
        unlink_inode(target, now, sid, open == '1', trash, new_parent, new_name)
      end
    end
    remove_edge(parent, name)
    add_edge(new_parent, new_name, ino, kind)
    if kind == DIR and not same_dir then
      src_dir.nlink = src_dir.nlink - 1
      dst_dir.nlink = dst_dir.nlink + 1
    end
    moved.parent, moved.cs, moved.cn = new_parent, now.s, now.n
    if restoring then
      moved.nlink = 1
      redis.call('HDEL', 'trashed', ino)
    end
    put(moved)
  end
  if same_dir then
    touch(dst_dir, now)
  else
    touch(src_dir, now)
    touch(dst_dir, now)
  end
  return 'ok'
end

function ops.readlink(now, ino)
  local a = must_node(ino)
  if a.kind ~= SYMLINK then fail('EINVAL') end
  local target = redis.call('GET', 's' .. ino)
  if not target then fail('ENOENT') end
  return target
end

function ops.readdir(now, ino, cookie, limit)
  must_dir(ino)
  local keys = redis.call('ZRANGEBYSCORE', 'z' .. ino, '(' .. cookie, '+inf', 'LIMIT', 0, limit)
  -- One HMGET per 1000 names: a call from Lua costs about as much as the work of a dozen.
  local out = {}
  for first = 1, #keys, 1000 do
    local last = math.min(first + 999, #keys)
    local values = redis.call('HMGET', 'd' .. ino, unpack(keys, first, last))
    for j, v in ipairs(values) do
      local i = first + j - 1
      if v then
        local child, kind, entry_cookie = string.match(v, '^([^,]+),([^,]+),([^,]+)$')
        out[#out + 1] = keys[i]
        out[#out + 1] = child
        out[#out + 1] = kind
        out[#out + 1] = entry_cookie
      end
    end
  end
  return out
end

function ops.getxattr(now, ino, name)
  must_node(ino)
  local v = redis.call('HGET', 'x' .. ino, name)
  if not v then fail('ENODATA') end
  return v
end

function ops.setxattr(now, ino, name, value, mode)
  local a = must_node(ino)
  local exists = redis.call('HEXISTS', 'x' .. ino, name) == 1
  if mode == 'create' and exists then fail('EEXIST') end
  if mode == 'replace' and not exists then fail('ENODATA') end
  redis.call('HSET', 'x' .. ino, name, value)
  a.cs, a.cn = now.s, now.n
  put(a)
  return 'ok'
end

function ops.listxattr(now, ino)
  must_node(ino)
  local names = redis.call('HKEYS', 'x' .. ino)
  table.sort(names)
  return names
end

function ops.removexattr(now, ino, name)
  local a = must_node(ino)
  if redis.call('HDEL', 'x' .. ino, name) == 0 then fail('ENODATA') end
  a.cs, a.cn = now.s, now.n
  put(a)
  return 'ok'
end

-- The slices of args[from..to], groups of chunk, id, size, off, len, pos, and the length of a
-- file of `length` bytes once they are in.
local function parse_pieces(args, from, to, length)
  local pieces, fin = {}, length
  for i = from, to, 6 do
    local s = { id = args[i + 1], size = tonumber(args[i + 2]), off = tonumber(args[i + 3]),
      len = tonumber(args[i + 4]), pos = tonumber(args[i + 5]) }
    pieces[#pieces + 1] = { chunk = args[i], s = s }
    fin = math.max(fin, tonumber(args[i]) * CHUNK + s.pos + s.len)
  end
  return pieces, fin
end

-- Adds `pieces` to file `a` (checked: it exists, it is a file, the space is there).
local function apply_write(a, pieces, fin, mtime_s, mtime_n)
  local ino = a.ino
  local chunks = {}
  for _, p in ipairs(pieces) do
    append_slice(ino, p.chunk, p.s)
    chunks[p.chunk] = true
  end
  bump('used_space', round_space(fin) - round_space(a.length))
  for chunk in pairs(chunks) do drop_hidden(ino, chunk) end
  a.length = fin
  a.ms, a.mn, a.cs, a.cn = mtime_s, mtime_n, mtime_s, mtime_n
  put(a)
  return attr_reply(a)
end

local function must_file(ino)
  local a = must_node(ino)
  if a.kind ~= FILE then fail('EINVAL') end
  return a
end

-- Arguments after the times: groups of chunk, id, size, off, len, pos.
function ops.write_slices(now, ino, mtime_s, mtime_n, ...)
  local args = { ... }
  local a = must_file(ino)
  local pieces, fin = parse_pieces(args, 1, #args, a.length)
  check_space(round_space(fin) - round_space(a.length))
  return apply_write(a, pieces, fin, mtime_s, mtime_n)
end

-- Arguments: for each file, its inode, mtime (two values), number of slices, then the
-- slices as for write_slices. Every check comes before the first change (a script that fails
-- part way keeps what it did), so the files are written all or none. A file given twice fails
-- the call (refs holds one member per file and slice).
function ops.write_files(now, ...)
  local args = { ... }
  local files, seen, delta, i = {}, {}, 0, 1
  while i <= #args do
    local n = tonumber(args[i + 3])
    local a = must_file(args[i])
    -- (The client refuses this before sending; the script keeps its own guard.)
    if seen[args[i]] then fail('EINVAL') end
    seen[args[i]] = true
    local pieces, fin = parse_pieces(args, i + 4, i + 3 + 6 * n, a.length)
    delta = delta + round_space(fin) - round_space(a.length)
    files[#files + 1] = { a = a, pieces = pieces, fin = fin, ms = args[i + 1],
      mn = args[i + 2] }
    i = i + 4 + 6 * n
  end
  check_space(delta)
  local out = {}
  for _, f in ipairs(files) do
    out[#out + 1] = apply_write(f.a, f.pieces, f.fin, f.ms, f.mn)
  end
  return out
end

-- Arguments: the new slice (id, size, off, len, pos), then the replaced ones likewise.
function ops.compact_chunk(now, ino, chunk, ...)
  local args = { ... }
  local function at(i)
    return { id = args[i], size = tonumber(args[i + 1]), off = tonumber(args[i + 2]),
      len = tonumber(args[i + 3]), pos = tonumber(args[i + 4]) }
  end
  local new = at(1)
  local replaced, ids = {}, {}
  for i = 6, #args, 5 do
    local r = at(i)
    replaced[#replaced + 1] = r
    ids[r.id] = true
  end
  local list = slices_of(ino, chunk)
  local still_there = true
  for _, r in ipairs(replaced) do
    local found = false
    for _, s in ipairs(list) do
      if s.id == r.id and s.size == r.size and s.off == r.off and s.len == r.len
          and s.pos == r.pos then
        found = true
      end
    end
    still_there = still_there and found
  end
  local last = 0
  for i, s in ipairs(list) do
    if ids[s.id] then last = i end
  end
  local prefix = last > 0
  for i = 1, last do prefix = prefix and ids[list[i].id] == true end
  if not still_there or not prefix or #replaced == 0 then
    queue_free(new.id, new.size)
    return 0
  end
  local rest = { new }
  for i = last + 1, #list do rest[#rest + 1] = list[i] end
  for _, r in ipairs(replaced) do free_slice(ino, r) end
  store_slices(ino, chunk, rest)
  if new.size > 0 then
    redis.call('ZADD', 'refs', new.id, new.id .. ':' .. int(new.size) .. ':' .. ino)
  end
  return 1
end

function ops.release(now, ino, sid)
  if redis.call('SREM', 'o' .. sid, ino) == 1 then
    redis.call('SREM', 'h' .. ino, sid)
    free_if_orphan(ino)
  end
  return 'ok'
end

-- Scans keys matching `pattern`, calling `f` with each.
local function scan(pattern, f)
  local cursor = '0'
  repeat
    local r = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = r[1]
    for _, key in ipairs(r[2]) do f(key) end
  until cursor == '0'
end

function ops.check_namespace(now, repair)
  repair = repair == '1'
  local problems = {}
  local function note(what, fix)
    problems[#problems + 1] = what
    problems[#problems + 1] = fix or ''
    problems[#problems + 1] = (repair and fix) and '1' or '0'
  end
  local nodes = {}
  scan('i[0-9]*', function(key)
    local ino = string.sub(key, 2)
    nodes[ino] = decode(ino, redis.call('GET', key))
  end)
  local names, dir_names, named_in, subdirs, in_trash_entry = {}, {}, {}, {}, {}
  scan('d[0-9]*', function(key)
    local parent = string.sub(key, 2)
    local p = nodes[parent]
    local flat = redis.call('HGETALL', key)
    for i = 1, #flat, 2 do
      local name = flat[i]
      local ino, kind = string.match(flat[i + 1], '^([^,]+),([^,]+)')
      kind = tonumber(kind)
      if not nodes[ino] then
        if repair then remove_edge(parent, name) end
        note(string.format('entry %q in directory %s names missing inode %s', name, parent, ino),
          'remove the entry')
      else
        if not p or p.kind ~= DIR then
          note(string.format('entry %q is in %s, which is not a directory', name, parent), nil)
        end
        if nodes[ino].kind == DIR then
          dir_names[ino] = (dir_names[ino] or 0) + 1
          if not named_in[ino] or tonumber(parent) < tonumber(named_in[ino]) then
            named_in[ino] = parent
          end
        elseif p and p.kind == DIR and p.parent == TRASH then
          in_trash_entry[ino] = true
        else
          names[ino] = (names[ino] or 0) + 1
        end
        if kind == DIR then subdirs[parent] = (subdirs[parent] or 0) + 1 end
      end
    end
  end)
  local function held(ino)
    return in_trash_entry[ino] or redis.call('SCARD', 'h' .. ino) > 0
  end
  local inodes, space, max_ino = 0, 0, 0
  for ino, a in pairs(nodes) do
    inodes = inodes + 1
    if a.kind == FILE then space = space + round_space(a.length) end
    if ino ~= TRASH then max_ino = math.max(max_ino, tonumber(ino)) end
    if a.kind ~= DIR then
      local n = names[ino] or 0
      if a.nlink == n then
        if n == 0 and not held(ino) then
          if repair then free_if_orphan(ino) end
          note(string.format('inode %s has no name and is not open', ino), 'free it')
        end
      elseif n == 0 and not held(ino) then
        note(string.format('inode %s has link count %d but no name: unreachable', ino, a.nlink),
          nil)
      else
        if repair then
          a.nlink = n
          put(a)
        end
        note(string.format('inode %s has link count %d, but %d entries name it', ino, a.nlink, n),
          'set the link count')
      end
    else
      local root = ino == ROOT or ino == TRASH
      local expected = named_in[ino]
      if ino == ROOT or ino == TRASH then expected = ROOT end
      local n = dir_names[ino] or 0
      if not root and n ~= 1 then
        note(string.format('directory %s has %d names (expected 1)', ino, n), nil)
      end
      local changed = false
      if expected and expected ~= a.parent then
        note(string.format('directory %s records parent %s but is in %s', ino, a.parent, expected),
          'set the parent')
        a.parent, changed = expected, true
      end
      local links = 2 + (subdirs[ino] or 0)
      if a.nlink ~= links then
        note(string.format('directory %s has link count %d, expected %d', ino, a.nlink, links),
          'set the link count')
        a.nlink, changed = links, true
      end
      if a.length ~= 4096 then
        note(string.format('directory %s has size %d, expected 4096', ino, a.length),
          'set the size')
        a.length, changed = 4096, true
      end
      if repair and changed then put(a) end
    end
  end
  scan('o[0-9]*', function(key)
    local sid = string.sub(key, 2)
    if redis.call('HEXISTS', 'sessions', sid) == 0 then
      for _, ino in ipairs(redis.call('SMEMBERS', key)) do
        if repair then
          redis.call('SREM', key, ino)
          redis.call('SREM', 'h' .. ino, sid)
          free_if_orphan(ino)
        end
        note(string.format('inode %s is held open by session %s, which is gone', ino, sid),
          'release it')
      end
    end
  end)
  for _, c in ipairs({ { 'used_inodes', inodes }, { 'used_space', space } }) do
    local recorded = counter(c[1])
    if recorded ~= c[2] then
      if repair then bump(c[1], c[2] - recorded) end
      note(string.format('counter %s is %s, actual %s', c[1], int(recorded), int(c[2])),
        'set the counter')
    end
  end
  local max_slice = 0
  for _, key in ipairs({ 'refs', 'freed' }) do
    local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    if top[2] then max_slice = math.max(max_slice, tonumber(top[2])) end
  end
  for _, c in ipairs({ { 'next_ino', max_ino }, { 'next_slice', max_slice } }) do
    local next_id = counter(c[1])
    if next_id <= c[2] then
      if repair then bump(c[1], c[2] + 1 - next_id) end
      note(string.format('counter %s is %s but %s is in use', c[1], int(next_id), int(c[2])),
        'raise the counter')
    end
  end
  return problems
end

local function dispatch(argv)
  local op = ops[argv[1]]
  if not op then fail('unknown operation ' .. tostring(argv[1])) end
  local now = { s = argv[2], n = argv[3], hour = argv[4] }
  return op(now, unpack(argv, 5))
end

-- The engine puts the entry point here: a registered function (Redis 7+, where the code above
-- runs once, at load) or a script's return (older servers, where it runs at every call).
-- @ENTRY@
