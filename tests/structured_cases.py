"""JSON schemas, regexes and grammars the structured-output tests generate against.

Bounded on purpose (short strings, few items, small integers): the tests' model is a tiny random
one, whose output the constraint alone makes valid; bounds let most samples finish within the
tiny context (128 tokens) instead of writing one endless string.
"""

from __future__ import annotations

SHORT = {"type": "string", "maxLength": 8}

SCHEMAS: dict[str, dict] = {
    "flat object": {
        "type": "object",
        "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "booleans and enum": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green", "blue"]}},
        "required": ["ok", "colour"],
        "additionalProperties": False,
    },
    "array of bounded integers": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 1, "maxItems": 4},
    "bounded number": {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5}},
        "required": ["x"],
        "additionalProperties": False,
    },
    "exclusive bounds": {
        "type": "object",
        "properties": {"p": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
        "required": ["p"],
        "additionalProperties": False,
    },
    "negative range": {"type": "integer", "minimum": -50, "maximum": -10},
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "admin": {"type": "boolean"}},
                "required": ["id", "admin"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "three levels": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"enum": [1, 2, 3]}},
                        "required": ["c"],
                        "additionalProperties": False,
                    }
                },
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "optional fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}, "note": SHORT, "flag": {"type": "boolean"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "all optional": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}},
        "additionalProperties": False,
    },
    "ref": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
        "additionalProperties": False,
    },
    "ref at the root": {
        "$ref": "#/$defs/size",
        "$defs": {"size": {"enum": ["S", "M", "L", "XL"]}},
    },
    "array of objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "integer", "minimum": 0, "maximum": 5}},
            "required": ["k", "v"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "boolean"}, {"enum": ["x", "y"]}, {"type": "integer", "minimum": 0, "maximum": 3}],
        "items": False,
        "minItems": 3,
    },
    "nullable": {
        "type": "object",
        "properties": {"maybe": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
        "required": ["maybe"],
        "additionalProperties": False,
    },
    "anyOf": {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 99}]}},
        "required": ["v"],
        "additionalProperties": False,
    },
    "const": {
        "type": "object",
        "properties": {"version": {"const": 2}, "kind": {"const": "point"}},
        "required": ["version", "kind"],
        "additionalProperties": False,
    },
    "string pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "string length bounds": {"type": "string", "minLength": 2, "maxLength": 5},
    "enum of mixed types": {"enum": ["one", 2, True, None]},
    "enum array": {
        "type": "array",
        "items": {"enum": ["north", "south", "east", "west"]},
        "minItems": 1,
        "maxItems": 3,
    },
    "integer object with required and optional arrays": {
        "type": "object",
        "properties": {
            "ids": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
            "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
        },
        "required": ["ids"],
        "additionalProperties": False,
    },
    "recursive tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "minimum": 0, "maximum": 9},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 1},
                },
                "required": ["v"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
}

# regex -> a Python pattern with the same meaning (both full-match; Rust's and Python's \d are Unicode digits)
REGEXES = [
    r"\d{3}-\d{4}",
    r"[a-z]{1,6}@[a-z]{1,6}\.(com|org)",
    r"(yes|no)",
    r"[A-Z][a-z]{0,5}( [A-Z][a-z]{0,5}){0,2}",
    r"\d{4}-\d{2}-\d{2}",
    r"0x[0-9a-f]{1,8}",
]

CHOICES = [["yes", "no"], ["red", "green", "blue", "dark blue"], ["Paris", "London", "New York", "Tōkyō"]]

# (grammar, the Python regex of the language it defines)
GRAMMARS = [
    ('start: num (OP num){0,3}\nnum: /[0-9]{1,3}/\nOP: "+" | "-" | "*"', r"[0-9]{1,3}([+\-*][0-9]{1,3}){0,3}"),  # Lark
    ('root ::= greeting " " name\ngreeting ::= "hello" | "hi"\nname ::= [a-z]{1,5}', r"(hello|hi) [a-z]{1,5}"),  # GBNF
]
