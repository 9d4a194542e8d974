%%% @doc A small, strict JSON codec (RFC 8259) for the tsdist control protocol.
%%%
%%% OTP 27 ships a `json' module, but tsdist also has to run on OTP 25, so the
%%% control-protocol client uses this self-contained codec instead.
%%%
%%% Decoding maps JSON to Erlang as follows: objects become maps with binary
%%% keys (for a repeated key the last value wins, as the helper's Go decoder
%%% does), arrays become lists, strings become UTF-8 binaries, numbers become
%%% integers when they have neither fraction nor exponent (of any size, exactly)
%%% and floats otherwise, and `true', `false' and `null' become those atoms.
%%%
%%% {@link decode/1} accepts exactly the RFC 8259 grammar and nothing more: no
%%% comments, trailing commas, leading zeros, `+' signs, single quotes,
%%% unescaped control characters, invalid UTF-8 or lone surrogates in strings,
%%% and no data after the value other than whitespace. For any binary it
%%% returns `{ok, Value}' or `{error, {invalid_json, Position, What}}', where
%%% Position is the 0-based byte offset of the problem; it never raises and
%%% never loops. Two limits keep hostile input cheap (RFC 8259 section 9 allows
%%% both): nesting is bounded at 512 arrays/objects, and a number literal may
%%% be at most 1024 bytes, because `binary_to_integer/1' is quadratic in the
%%% number of digits on OTP 25.
%%%
%%% {@link encode/1} produces compact JSON as iodata. Object members come out
%%% sorted by key, so equal terms always give identical bytes. Anything that
%%% has no JSON form, or would give invalid or ambiguous JSON (an invalid UTF-8
%%% binary, an improper list, a map in which an atom key and a binary key
%%% spell the same name), raises `error({badarg, Term})'.
-module(tailscale_json).

-export([decode/1, encode/1, encode_to_binary/1]).
-export_type([json/0, encodable/0, error_reason/0, what/0]).

-type json() :: null | boolean() | number() | binary() | [json()]
              | #{binary() => json()}.
%% What `decode/1' returns.
-type encodable() :: null | boolean() | atom() | number() | binary()
                   | [encodable()] | #{binary() | atom() => encodable()}.
%% What `encode/1' accepts: atoms other than true/false/null become strings.
-type what() :: unexpected_end | {unexpected_byte, byte()} | trailing_data
              | too_deep | invalid_escape | lone_surrogate | invalid_utf8
              | unescaped_control_character | leading_zero | invalid_number
              | number_too_long | number_out_of_range.
-type error_reason() :: {invalid_json, Position :: non_neg_integer(), what()}.

-define(MAX_DEPTH, 512).
-define(MAX_NUMBER_BYTES, 1024).
-define(IS_WS(C), (C =:= $\s orelse C =:= $\t orelse C =:= $\n orelse C =:= $\r)).
-define(IS_DIGIT(C), (C >= $0 andalso C =< $9)).
-define(IS_E(C), (C =:= $e orelse C =:= $E)).

%%% Decoding

-spec decode(binary()) -> {ok, json()} | {error, error_reason()}.
decode(Bin) when is_binary(Bin) ->
    %% Errors are thrown with the unparsed rest of the input; its size gives
    %% the position, so the hot path never has to count bytes.
    try value(ws(Bin), 0) of
        {Value, Rest} ->
            case ws(Rest) of
                <<>> -> {ok, Value};
                Trailing -> position(Bin, Trailing, trailing_data)
            end
    catch
        throw:{?MODULE, At, What} -> position(Bin, At, What)
    end.

position(Bin, At, What) ->
    {error, {invalid_json, byte_size(Bin) - byte_size(At), What}}.

-spec fail(binary(), what()) -> no_return().
fail(At, What) -> throw({?MODULE, At, What}).

-spec unexpected(binary()) -> no_return().
unexpected(<<>>) -> fail(<<>>, unexpected_end);
unexpected(<<C, _/binary>> = At) -> fail(At, {unexpected_byte, C}).

ws(<<C, Rest/binary>>) when ?IS_WS(C) -> ws(Rest);
ws(Bin) -> Bin.

value(<<C, _/binary>> = At, Depth) when (C =:= $[ orelse C =:= ${),
                                        Depth >= ?MAX_DEPTH ->
    fail(At, too_deep);
value(<<$[, Rest/binary>>, Depth) ->
    case ws(Rest) of
        <<$], Rest1/binary>> -> {[], Rest1};
        Rest1 -> elements(Rest1, Depth + 1, [])
    end;
value(<<${, Rest/binary>>, Depth) ->
    case ws(Rest) of
        <<$}, Rest1/binary>> -> {#{}, Rest1};
        Rest1 -> members(Rest1, Depth + 1, #{})
    end;
value(<<$", Rest/binary>>, _) -> string(Rest, Rest, 0, []);
value(<<"true", Rest/binary>>, _) -> {true, Rest};
value(<<"false", Rest/binary>>, _) -> {false, Rest};
value(<<"null", Rest/binary>>, _) -> {null, Rest};
value(<<C, _/binary>> = Bin, _) when C =:= $-; ?IS_DIGIT(C) -> number(Bin);
value(Bin, _) -> unexpected(Bin).

elements(Bin, Depth, Acc) ->
    {Value, Rest} = value(Bin, Depth),
    case ws(Rest) of
        <<$,, Rest1/binary>> -> elements(ws(Rest1), Depth, [Value | Acc]);
        <<$], Rest1/binary>> -> {lists:reverse(Acc, [Value]), Rest1};
        Rest1 -> unexpected(Rest1)
    end.

members(<<$", Rest/binary>>, Depth, Map) ->
    {Key, Rest1} = string(Rest, Rest, 0, []),
    case ws(Rest1) of
        <<$:, Rest2/binary>> ->
            {Value, Rest3} = value(ws(Rest2), Depth),
            case ws(Rest3) of
                <<$,, Rest4/binary>> -> members(ws(Rest4), Depth, Map#{Key => Value});
                <<$}, Rest4/binary>> -> {Map#{Key => Value}, Rest4};
                Rest4 -> unexpected(Rest4)
            end;
        Rest2 -> unexpected(Rest2)
    end;
members(Bin, _, _) -> unexpected(Bin).

%% Runs of plain bytes are counted rather than copied, so a string without
%% escapes costs one sub-binary; Acc (an iolist) only grows at escapes.
string(<<$", Rest/binary>>, Start, Len, Acc) ->
    Run = binary_part(Start, 0, Len),
    case Acc of
        [] -> {Run, Rest};
        _ -> {iolist_to_binary([Acc, Run]), Rest}
    end;
string(<<$\\, Rest/binary>> = At, Start, Len, Acc) ->
    {Char, Rest1} = escape(Rest, At),
    string(Rest1, Rest1, 0, [Acc, binary_part(Start, 0, Len), Char]);
string(<<C, Rest/binary>>, Start, Len, Acc) when C >= 16#20, C < 16#80 ->
    string(Rest, Start, Len + 1, Acc);
string(<<C, _/binary>> = At, _, _, _) when C < 16#20 ->
    fail(At, unescaped_control_character);
%% The utf8 segment type rejects overlong forms, surrogates and code points
%% above 16#10FFFF, so this one clause is the whole UTF-8 validation.
string(<<C/utf8, Rest/binary>>, Start, Len, Acc) ->
    string(Rest, Start, Len + utf8_size(C), Acc);
string(<<>>, _, _, _) -> fail(<<>>, unexpected_end);
string(At, _, _, _) -> fail(At, invalid_utf8).

%% Computed rather than measured by byte_size/1, which would make the compiler
%% materialise a sub-binary for every non-ASCII character.
utf8_size(C) when C < 16#800 -> 2;
utf8_size(C) when C < 16#10000 -> 3;
utf8_size(_) -> 4.

escape(<<$", Rest/binary>>, _) -> {<<$">>, Rest};
escape(<<$\\, Rest/binary>>, _) -> {<<$\\>>, Rest};
escape(<<$/, Rest/binary>>, _) -> {<<$/>>, Rest};
escape(<<$b, Rest/binary>>, _) -> {<<$\b>>, Rest};
escape(<<$f, Rest/binary>>, _) -> {<<$\f>>, Rest};
escape(<<$n, Rest/binary>>, _) -> {<<$\n>>, Rest};
escape(<<$r, Rest/binary>>, _) -> {<<$\r>>, Rest};
escape(<<$t, Rest/binary>>, _) -> {<<$\t>>, Rest};
escape(<<$u, Rest/binary>>, At) ->
    case hex4(Rest, At) of
        {Hi, <<"\\u", Rest1/binary>>} when Hi >= 16#D800, Hi =< 16#DBFF ->
            case hex4(Rest1, At) of
                {Lo, Rest2} when Lo >= 16#DC00, Lo =< 16#DFFF ->
                    C = 16#10000 + ((Hi - 16#D800) bsl 10) + (Lo - 16#DC00),
                    {<<C/utf8>>, Rest2};
                _ -> fail(At, lone_surrogate)
            end;
        {C, _} when C >= 16#D800, C =< 16#DFFF -> fail(At, lone_surrogate);
        {C, Rest1} -> {<<C/utf8>>, Rest1}
    end;
escape(<<>>, _) -> fail(<<>>, unexpected_end);
escape(_, At) -> fail(At, invalid_escape).

hex4(<<A, B, C, D, Rest/binary>>, At) ->
    {(hex(A, At) bsl 12) bor (hex(B, At) bsl 8) bor (hex(C, At) bsl 4) bor hex(D, At),
     Rest};
hex4(_, At) -> fail(At, invalid_escape).

%% Not binary_to_integer(_, 16): it would also accept a sign.
hex(C, _) when ?IS_DIGIT(C) -> C - $0;
hex(C, _) when C >= $a, C =< $f -> C - $a + 10;
hex(C, _) when C >= $A, C =< $F -> C - $A + 10;
hex(_, At) -> fail(At, invalid_escape).

%% The scanner below enforces the grammar and finds where the literal ends;
%% the BIFs then only ever see text they accept (apart from float overflow).
number(Bin) ->
    {Kind, Rest} = case Bin of
                       <<$-, Unsigned/binary>> -> int_part(Unsigned);
                       _ -> int_part(Bin)
                   end,
    Len = byte_size(Bin) - byte_size(Rest),
    Len =< ?MAX_NUMBER_BYTES orelse fail(Bin, number_too_long),
    {to_number(Kind, binary_part(Bin, 0, Len), Bin), Rest}.

int_part(<<$0, D, _/binary>> = At) when ?IS_DIGIT(D) -> fail(At, leading_zero);
int_part(<<$0, Rest/binary>>) -> fraction(Rest);
int_part(<<D, Rest/binary>>) when D >= $1, D =< $9 -> fraction(digits(Rest));
int_part(At) -> fail(At, invalid_number).

digits(<<D, Rest/binary>>) when ?IS_DIGIT(D) -> digits(Rest);
digits(Bin) -> Bin.

fraction(<<$., D, Rest/binary>>) when ?IS_DIGIT(D) -> exponent(digits(Rest), float);
fraction(<<$., _/binary>> = At) -> fail(At, invalid_number);
fraction(Bin) -> exponent(Bin, integer).

exponent(<<E, S, D, Rest/binary>>, _) when ?IS_E(E), (S =:= $+ orelse S =:= $-),
                                           ?IS_DIGIT(D) ->
    {float, digits(Rest)};
exponent(<<E, D, Rest/binary>>, _) when ?IS_E(E), ?IS_DIGIT(D) -> {float, digits(Rest)};
exponent(<<E, _/binary>> = At, _) when ?IS_E(E) -> fail(At, invalid_number);
exponent(Rest, Kind) -> {Kind, Rest}.

to_number(integer, Literal, _) -> binary_to_integer(Literal);
to_number(float, Literal, At) ->
    %% binary_to_float/1 insists on a fraction ("1e5" is badarg).
    Text = case binary:match(Literal, <<".">>) of
               nomatch ->
                   [Mantissa, Exp] = binary:split(Literal, [<<"e">>, <<"E">>]),
                   <<Mantissa/binary, ".0e", Exp/binary>>;
               _ -> Literal
           end,
    try binary_to_float(Text)
    catch error:badarg -> fail(At, number_out_of_range)
    end.

%%% Encoding

-spec encode(encodable()) -> iodata().
encode(true) -> <<"true">>;
encode(false) -> <<"false">>;
encode(null) -> <<"null">>;
encode(A) when is_atom(A) -> encode_string(atom_to_binary(A, utf8));
encode(B) when is_binary(B) -> encode_string(B);
encode(I) when is_integer(I) -> integer_to_binary(I);
encode(F) when is_float(F) -> float_to_binary(F, [short]);
encode([]) -> <<"[]">>;
encode([H | T] = L) -> [$[, encode(H) | encode_tail(T, L)];
encode(M) when is_map(M), map_size(M) =:= 0 -> <<"{}">>;
encode(M) when is_map(M) ->
    Pairs = lists:ukeysort(1, [{key(K), V} || {K, V} <- maps:to_list(M)]),
    %% #{a => 1, <<"a">> => 2} would name a member twice, and receivers differ
    %% in which one they keep.
    length(Pairs) =:= map_size(M) orelse error({badarg, M}),
    [First | More] = [[encode_string(K), $: | encode(V)] || {K, V} <- Pairs],
    [${, First, [[$, | Pair] || Pair <- More], $}];
encode(Term) -> error({badarg, Term}).

encode_tail([], _) -> [$]];
encode_tail([H | T], L) -> [$,, encode(H) | encode_tail(T, L)];
encode_tail(_, L) -> error({badarg, L}).

key(K) when is_binary(K) -> K;
key(K) when is_atom(K) -> atom_to_binary(K, utf8);
key(K) -> error({badarg, K}).

-spec encode_to_binary(encodable()) -> binary().
encode_to_binary(Term) -> iolist_to_binary(encode(Term)).

encode_string(Bin) -> [$", escape_string(Bin, Bin, 0, Bin), $"].

%% Same run-counting as the decoder: unescaped text is emitted as sub-binaries.
escape_string(<<C, Rest/binary>>, Start, Len, Orig)
  when C >= 16#20, C < 16#80, C =/= $", C =/= $\\ ->
    escape_string(Rest, Start, Len + 1, Orig);
escape_string(<<C, Rest/binary>>, Start, Len, Orig) when C < 16#80 ->
    [binary_part(Start, 0, Len), escape_char(C) | escape_string(Rest, Rest, 0, Orig)];
escape_string(<<C/utf8, Rest/binary>>, Start, Len, Orig) ->
    escape_string(Rest, Start, Len + utf8_size(C), Orig);
escape_string(<<>>, Start, _, _) -> Start;
escape_string(_, _, _, Orig) -> error({badarg, Orig}).

escape_char($") -> <<"\\\"">>;
escape_char($\\) -> <<"\\\\">>;
escape_char($\b) -> <<"\\b">>;
escape_char($\f) -> <<"\\f">>;
escape_char($\n) -> <<"\\n">>;
escape_char($\r) -> <<"\\r">>;
escape_char($\t) -> <<"\\t">>;
escape_char(C) -> <<"\\u00", (hex_digit(C bsr 4)), (hex_digit(C band 15))>>.

hex_digit(D) when D < 10 -> $0 + D;
hex_digit(D) -> $a + D - 10.
