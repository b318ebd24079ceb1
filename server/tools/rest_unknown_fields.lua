-- Refuses a REST request whose JSON body has a field its method's message does not define:
-- Envoy's grpc_json_transcoder drops such fields silently and has no option to refuse them
-- (envoyproxy/envoy#46623). envoy.yaml runs this before the transcoder, on REST routes only;
-- the refusal is a local reply that its local_reply_config makes a JSON google.rpc.Status
-- (ErrorInfo UNKNOWN_FIELD, BadRequest naming the field as the REST caller wrote it).
-- Only a body that parses is refused: whatever this walker does not understand (malformed
-- JSON, nesting deeper than the transcoder takes) goes on to the transcoder, which answers
-- MALFORMED_REQUEST. Values are not checked here: the transcoder does that.

local find, sub, byte, char = string.find, string.sub, string.byte, string.char

-- The transcoder refuses deeper bodies itself (MALFORMED_REQUEST).
local MAX_DEPTH = 100
local LITERALS = { "true", "false", "null" }

-- Message references in MESSAGES become the tables they name (recursive messages included).
for _, fields in pairs(MESSAGES) do
  for name, kind in pairs(fields) do
    if kind then fields[name] = MESSAGES[kind] end
  end
end

-- A key as protobuf's JSON parser reads it, escapes decoded; anything not ASCII becomes
-- "\127", which no field name contains.
local function decoded(key)
  return (key:gsub("\\(.)(%x?%x?%x?%x?)", function(escape, hex)
    if escape == "u" and #hex == 4 then
      local code = tonumber(hex, 16)
      return code < 128 and char(code) or "\127"
    end
    return (escape == "\\" or escape == "/" or escape == '"') and escape .. hex or "\127" .. hex
  end))
end

-- The position of the quote that closes the string opened at s[i].
local function string_end(s, i)
  repeat
    i = find(s, '["\\]', i + 1)
    if not i then return nil end
    local quote = byte(s, i) == 34
    if not quote then i = i + 1 end  -- the escaped character
  until quote
  return i
end

local function skip_space(s, i)
  return find(s, "[^ \t\r\n]", i)
end

-- Whether a key's bytes are UTF-8 (loosely), so that the reply can name it; a key that is not
-- goes on to the transcoder, which refuses invalid UTF-8.
local function is_utf8(s)
  local i = 1
  while i <= #s do
    local c = byte(s, i)
    local n = c < 128 and 0 or c >= 194 and c < 224 and 1 or c >= 224 and c < 240 and 2
      or c >= 240 and c < 245 and 3
    if not n or find(sub(s, i + 1, i + n), "[^\128-\191]") or i + n > #s then return false end
    i = i + n + 1
  end
  return true
end

-- The body being walked: the keys and array indexes that lead to the value at hand, and the
-- first unknown field met. A walk never yields, so no other request's walk interleaves.
local path, unknown = {}, nil

-- path[1..n] and then `key`, as the REST caller writes it (items[0].quantity), built only for
-- an unknown field: a path string for every value would double the walk's cost.
local function named(n, key)
  local text = ""
  for k = 1, n do
    local part = path[k]
    text = type(part) == "number" and text .. "[" .. part .. "]"
      or (text == "" and part or text .. "." .. part)
  end
  return text == "" and key or text .. "." .. key
end

-- Walks the JSON value at or after s[i] and returns the position after it, or nil when it is
-- not JSON this understands. `fields`: the fields of the message the value is, by JSON and
-- proto name, or false when its keys are not checked (a map, Struct, Value, Any or a
-- scalar); path[1..n] leads to the value.
local function walk(s, i, fields, n, depth)
  i = skip_space(s, i)
  if not i then return nil end
  local c = byte(s, i)
  if c == 34 then  -- a string
    local close = string_end(s, i)
    return close and close + 1
  elseif c == 123 then  -- an object
    if depth >= MAX_DEPTH then return nil end
    i = skip_space(s, i + 1)
    if i and byte(s, i) == 125 then return i + 1 end
    while i and byte(s, i) == 34 do
      local close = string_end(s, i)
      if not close then return nil end
      local inner = false
      if fields then
        local key = sub(s, i + 1, close - 1)
        local known = fields[key]
        if known == nil and find(key, "\\", 1, true) then known = fields[decoded(key)] end
        if known == nil then
          unknown = unknown or named(n, key)
        elseif known then
          inner, path[n + 1] = known, key
        end
      end
      local _, colon = find(s, "^[ \t\r\n]*:", close + 1)
      if not colon then return nil end
      i = walk(s, colon + 1, inner, n + 1, depth + 1)
      i = i and skip_space(s, i)
      if not i then return nil end
      c = byte(s, i)
      if c == 125 then return i + 1 end
      if c ~= 44 then return nil end
      i = skip_space(s, i + 1)
    end
    return nil
  elseif c == 91 then  -- an array: a repeated field's elements are each of its type
    if depth >= MAX_DEPTH then return nil end
    i = skip_space(s, i + 1)
    if i and byte(s, i) == 93 then return i + 1 end
    local index = 0
    while i do
      path[n + 1] = index
      i = walk(s, i, fields, n + 1, depth + 1)
      i = i and skip_space(s, i)
      if not i then return nil end
      c = byte(s, i)
      if c == 93 then return i + 1 end
      if c ~= 44 then return nil end
      i, index = i + 1, index + 1
    end
    return nil
  end
  -- a number, true, false or null (loosely: the transcoder checks values)
  local _, last = find(s, "^-?%d[%d.eE+-]*", i)
  if last then return last + 1 end
  for _, word in ipairs(LITERALS) do
    if sub(s, i, i + #word - 1) == word then return i + #word end
  end
  return nil
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if find(headers:get("content-type") or "", "^application/grpc") then return end
  local method, target = headers:get(":method"), headers:get(":path")
  target = sub(target, 1, (find(target, "?", 1, true) or 0) - 1)
  for _, route in ipairs(ROUTES) do
    if route[1] == method and find(target, route[2]) then
      local body = handle:body()
      if not body then return end
      local text = body:getBytes(0, body:length())
      path[1], unknown = route[4], nil
      local n = route[4] == "" and 0 or 1
      local after = find(text, "^[ \t\r\n]*{") and walk(text, 1, MESSAGES[route[3]], n, 0)
      if after and not skip_space(text, after) and unknown and is_utf8(unknown) then
        handle:streamInfo():dynamicMetadata():set("marketplace.rest", "unknown_field", unknown)
        handle:respond({ [":status"] = "400" }, "unknown field " .. unknown)
      end
      return
    end
  end
end
