-- The function catalog: registered functions and their scripts, columns as in the
-- service we replace, plus result_schema (the JSON schema of a function's result).
-- A session initialized from a catalog function copies its script and params
-- schema at Initialize, so later changes here never alter a running session.
CREATE TABLE meta.functions (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    language          varchar(32) NOT NULL,
    title             varchar(64) NOT NULL,
    language_title    varchar(128) NOT NULL UNIQUE,
    description       text,
    schema_definition jsonb,
    result_schema     jsonb,
    examples          jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    created_by        varchar(128),
    is_active         boolean NOT NULL DEFAULT true,
    version           varchar(32) NOT NULL DEFAULT '1.0.0',
    tags              varchar(64)[] NOT NULL DEFAULT '{}',
    function_type     varchar(16) NOT NULL DEFAULT 'predefined'
                      CHECK (function_type IN ('predefined', 'dynamic'))
);

CREATE INDEX functions_language_idx ON meta.functions (language);
CREATE INDEX functions_is_active_idx ON meta.functions (is_active);
CREATE INDEX functions_tags_idx ON meta.functions USING gin (tags);

CREATE TABLE meta.scripts (
    function_id uuid PRIMARY KEY REFERENCES meta.functions (id) ON DELETE CASCADE,
    content     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION meta.touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER functions_touch_updated_at BEFORE UPDATE ON meta.functions
    FOR EACH ROW EXECUTE FUNCTION meta.touch_updated_at();
CREATE TRIGGER scripts_touch_updated_at BEFORE UPDATE ON meta.scripts
    FOR EACH ROW EXECUTE FUNCTION meta.touch_updated_at();

-- The three defaults of the service we replace; the scripts are our own.
INSERT INTO meta.functions
    (language, title, language_title, description, schema_definition, result_schema,
     examples, created_by, tags, function_type)
VALUES
(
    'nodejs', 'calculator', 'nodejs-calculator',
    'Adds, subtracts, multiplies or divides two numbers. Division by zero and an '
    'unknown operation are runtime errors.',
    '{"$schema": "https://json-schema.org/draft/2020-12/schema",
      "type": "object",
      "properties": {
        "operation": {"type": "string", "enum": ["add", "subtract", "multiply", "divide"],
                      "description": "what to do with a and b"},
        "a": {"type": "number", "description": "the left operand"},
        "b": {"type": "number", "description": "the right operand"}
      },
      "required": ["operation", "a", "b"]}',
    '{"$schema": "https://json-schema.org/draft/2020-12/schema",
      "type": "object",
      "properties": {"result": {"type": "number"}},
      "required": ["result"]}',
    '[{"params": {"operation": "add", "a": 5, "b": 3}, "result": {"result": 8}},
      {"params": {"operation": "multiply", "a": 6, "b": 7}, "result": {"result": 42}},
      {"params": {"operation": "divide", "a": 10, "b": 4}, "result": {"result": 2.5}}]',
    'system', '{math,calculator}', 'predefined'
),
(
    'python', 'text_processor', 'python-text_processor',
    'Counts the words or characters of a text, or changes its case.',
    '{"$schema": "https://json-schema.org/draft/2020-12/schema",
      "type": "object",
      "properties": {
        "action": {"type": "string", "enum": ["count_words", "count_chars", "uppercase", "lowercase"],
                   "description": "what to do with the text"},
        "text": {"type": "string", "description": "the text"}
      },
      "required": ["action", "text"]}',
    '{"$schema": "https://json-schema.org/draft/2020-12/schema",
      "type": "object",
      "properties": {"result": {"type": ["integer", "string"]}},
      "required": ["result"]}',
    '[{"params": {"action": "uppercase", "text": "hello"}, "result": {"result": "HELLO"}},
      {"params": {"action": "count_words", "text": "Hello World"}, "result": {"result": 2}},
      {"params": {"action": "count_chars", "text": "abc"}, "result": {"result": 3}}]',
    'system', '{text,string}', 'predefined'
),
(
    'rust', 'data_validator', 'rust-data_validator',
    'Checks an object against rules: "required" (the object is not empty) and '
    '"numeric" (every value is a number).',
    '{"$schema": "https://json-schema.org/draft/2020-12/schema",
      "type": "object",
      "properties": {
        "data": {"type": "object", "description": "the object to check"},
        "rules": {"type": "array", "items": {"type": "string", "enum": ["required", "numeric"]},
                  "description": "the rules to check it against"}
      },
      "required": ["data", "rules"]}',
    '{"$schema": "https://json-schema.org/draft/2020-12/schema",
      "type": "object",
      "properties": {
        "valid": {"type": "boolean"},
        "errors": {"type": "array", "items": {"type": "string"}}
      },
      "required": ["valid", "errors"]}',
    '[{"params": {"data": {"age": 30, "height": 1.8}, "rules": ["required", "numeric"]},
       "result": {"valid": true, "errors": []}},
      {"params": {"data": {"age": "thirty"}, "rules": ["numeric"]},
       "result": {"valid": false, "errors": ["age is not a number"]}}]',
    'system', '{validation,data}', 'predefined'
)
ON CONFLICT (language_title) DO NOTHING;

INSERT INTO meta.scripts (function_id, content)
SELECT f.id, s.content
FROM (VALUES
(
    'nodejs-calculator',
    $js$// The catalog's calculator: {operation, a, b} -> {result}.
const operations = {
  add: (a, b) => a + b,
  subtract: (a, b) => a - b,
  multiply: (a, b) => a * b,
  divide: (a, b) => {
    if (b === 0) {
      throw new Error('Division by zero');
    }
    return a / b;
  },
};

module.exports = (event, callback) => {
  const { operation, a, b } = event.params || {};
  if (!Object.prototype.hasOwnProperty.call(operations, operation)) {
    callback(new Error(`Unknown operation: ${operation}`));
    return;
  }
  if (typeof a !== 'number' || typeof b !== 'number') {
    callback(new TypeError('a and b must be numbers'));
    return;
  }
  let result;
  try {
    result = operations[operation](a, b);
  } catch (err) {
    callback(err);
    return;
  }
  callback(null, { result });
};
$js$
),
(
    'python-text_processor',
    $py$"""The catalog's text processor: {action, text} -> {"result": ...}."""

ACTIONS = {
    "count_words": lambda text: len(text.split()),
    "count_chars": len,
    "uppercase": str.upper,
    "lowercase": str.lower,
}


def handler(context):
    params = context["params"]
    action = params.get("action")
    text = params.get("text", "")
    operation = ACTIONS.get(action) if isinstance(action, str) else None
    if operation is None:
        raise ValueError(f"Unknown action: {action!r}")
    if not isinstance(text, str):
        raise TypeError("text must be a string")
    return {"result": operation(text)}
$py$
),
(
    'rust-data_validator',
    $rs$//! The catalog's data validator: {data, rules} -> {valid, errors}.
use serde_json::{Map, Value};

pub fn handler(context: Map<String, Value>) -> Result<Value, String> {
    let params = context
        .get("params")
        .and_then(Value::as_object)
        .ok_or("params must be an object")?;
    let data = params
        .get("data")
        .and_then(Value::as_object)
        .ok_or("params.data must be an object")?;
    let rules = params
        .get("rules")
        .and_then(Value::as_array)
        .ok_or("params.rules must be an array")?;
    let mut errors: Vec<Value> = Vec::new();
    for rule in rules {
        match rule.as_str() {
            Some("required") => {
                if data.is_empty() {
                    errors.push(Value::from("data must not be empty"));
                }
            }
            Some("numeric") => {
                for (key, value) in data.iter() {
                    if !value.is_number() {
                        errors.push(Value::from(format!("{} is not a number", key)));
                    }
                }
            }
            Some(other) => return Err(format!("unknown rule: {}", other)),
            None => return Err(String::from("every rule must be a string")),
        }
    }
    let mut answer = Map::new();
    answer.insert(String::from("valid"), Value::Bool(errors.is_empty()));
    answer.insert(String::from("errors"), Value::Array(errors));
    Ok(Value::Object(answer))
}
$rs$
)
) AS s (language_title, content)
JOIN meta.functions f ON f.language_title = s.language_title
ON CONFLICT (function_id) DO NOTHING;
