%%% EUnit tests for tailscale_json: valid documents (including the control
%%% protocol's own messages), every escape, surrogate pairs, invalid inputs
%%% with the position and reason reported, the depth and number-size bounds,
%%% encoding, round trips, and a seeded fuzz loop asserting decode/1 never
%%% raises.
-module(tailscale_json_tests).

-include_lib("eunit/include/eunit.hrl").

%% rebar.config compiles tests with warn_missing_spec, and EUnit's parse
%% transform exports test/0 and every *_test/*_test_ function.
-type tests() :: [term()] | term().
-spec test() -> ok | error.

-define(HELLO, <<"{\"id\":1,\"ok\":true,\"result\":{\"version\":1,\"helper\":\"0.1.0\","
                 "\"hostname\":\"alpha\",\"state\":\"Running\",\"local_only\":true}}">>).
-define(ACCEPT, <<"{\"event\":\"accept\",\"fd\":true,\"listener_port\":4370,\"peer\":"
                  "{\"addr\":\"100.64.0.2:40001\",\"node\":\"beta\",\"dns_name\":"
                  "\"beta.tsdist.test\",\"user\":\"user-2@x\",\"tags\":[],"
                  "\"ips\":[\"100.64.0.2\",\"fd7a::2\"]}}">>).
-define(ERROR, <<"{\"id\":7,\"ok\":false,\"error\":{\"code\":\"bad_request\","
                 "\"message\":\"port 70000 out of range \\u003c0-65535\\u003e\"}}">>).

%% Titles escape control characters, which the inputs are full of.
title(Bin) -> lists:flatten(io_lib:print(Bin, 1, 1000000, -1)).

decode_ok(Bin) ->
    {ok, Value} = tailscale_json:decode(Bin),
    Value.

%%% Valid documents

-spec valid_test_() -> tests().
valid_test_() ->
    Cases =
        [{?HELLO, #{<<"id">> => 1, <<"ok">> => true,
                    <<"result">> => #{<<"version">> => 1, <<"helper">> => <<"0.1.0">>,
                                      <<"hostname">> => <<"alpha">>,
                                      <<"state">> => <<"Running">>,
                                      <<"local_only">> => true}}},
         {?ACCEPT, #{<<"event">> => <<"accept">>, <<"fd">> => true,
                     <<"listener_port">> => 4370,
                     <<"peer">> => #{<<"addr">> => <<"100.64.0.2:40001">>,
                                     <<"node">> => <<"beta">>,
                                     <<"dns_name">> => <<"beta.tsdist.test">>,
                                     <<"user">> => <<"user-2@x">>, <<"tags">> => [],
                                     <<"ips">> => [<<"100.64.0.2">>, <<"fd7a::2">>]}}},
         {?ERROR, #{<<"id">> => 7, <<"ok">> => false,
                    <<"error">> => #{<<"code">> => <<"bad_request">>,
                                     <<"message">> => <<"port 70000 out of range <0-65535>">>}}},
         {<<"true">>, true}, {<<"false">>, false}, {<<"null">>, null},
         {<<"0">>, 0}, {<<"-0">>, 0}, {<<"7">>, 7}, {<<"-12">>, -12},
         {<<"18446744073709551615">>, 18446744073709551615},
         {<<"-9223372036854775808">>, -9223372036854775808},
         {<<"123456789012345678901234567890">>, 123456789012345678901234567890},
         {<<"1.5">>, 1.5}, {<<"-0.25">>, -0.25}, {<<"0.0">>, 0.0}, {<<"-0.0">>, -0.0},
         {<<"1.0">>, 1.0}, {<<"1e5">>, 1.0e5}, {<<"1E5">>, 1.0e5}, {<<"1e+5">>, 1.0e5},
         {<<"-2e-3">>, -0.002}, {<<"0e0">>, 0.0}, {<<"0.5E-2">>, 0.005},
         {<<"1.7976931348623157e308">>, 1.7976931348623157e308},
         {<<"5e-324">>, 5.0e-324}, {<<"1e-400">>, 0.0},
         {<<"\"\"">>, <<>>}, {<<"\"abc\"">>, <<"abc">>},
         {<<"\"é€😀\""/utf8>>, <<"é€😀"/utf8>>},
         {<<"\"\x7f\"">>, <<"\x7f">>},
         {<<"[]">>, []}, {<<"{}">>, #{}}, {<<"[ ]">>, []}, {<<"{ }">>, #{}},
         {<<"[1,[2,[3,[]]],{\"a\":[{}]}]">>, [1, [2, [3, []]], #{<<"a">> => [#{}]}]},
         {<<"{\"a\":1,\"b\":2,\"a\":3}">>, #{<<"a">> => 3, <<"b">> => 2}},
         {<<"{\"\":0}">>, #{<<>> => 0}},
         {<<"{\"a\\u0000b\":null}">>, #{<<"a", 0, "b">> => null}},
         {<<" \t\r\n[ \t\r\n1 \t\r\n, \t\r\n{ \t\r\n\"k\" \t\r\n: \t\r\n"
            "true \t\r\n} \t\r\n] \t\r\n">>, [1, #{<<"k">> => true}]}],
    [{title(In), ?_assertEqual({ok, Out}, tailscale_json:decode(In))}
     || {In, Out} <- Cases].

%% assertEqual uses ==, under which 1.0 == 1; decoded numbers must also have
%% the right type (and -0.0 its sign).
-spec number_types_test() -> ok.
number_types_test() ->
    ?assert(is_integer(decode_ok(<<"10">>))),
    ?assert(is_float(decode_ok(<<"10.0">>))),
    ?assert(is_float(decode_ok(<<"1e1">>))),
    ?assertEqual(<<"-0.0">>, float_to_binary(decode_ok(<<"-0.0">>), [short])),
    ?assertEqual(<<"0.0">>, float_to_binary(decode_ok(<<"0e-5">>), [short])).

-spec escapes_test_() -> tests().
escapes_test_() ->
    Cases =
        [{<<"\\\"">>, <<"\"">>}, {<<"\\\\">>, <<"\\">>}, {<<"\\/">>, <<"/">>},
         {<<"\\b">>, <<8>>}, {<<"\\f">>, <<12>>}, {<<"\\n">>, <<10>>},
         {<<"\\r">>, <<13>>}, {<<"\\t">>, <<9>>},
         {<<"\\u0000">>, <<0>>}, {<<"\\u001f">>, <<31>>}, {<<"\\u0041">>, <<"A">>},
         {<<"\\u00e9">>, <<"é"/utf8>>}, {<<"\\u00E9">>, <<"é"/utf8>>},
         {<<"\\u20AC">>, <<"€"/utf8>>}, {<<"\\u20ac">>, <<"€"/utf8>>},
         {<<"\\u07ff">>, <<16#7FF/utf8>>}, {<<"\\u0800">>, <<16#800/utf8>>},
         {<<"\\ud7ff">>, <<16#D7FF/utf8>>}, {<<"\\ue000">>, <<16#E000/utf8>>},
         {<<"\\uffff">>, <<16#FFFF/utf8>>},
         %% Surrogate pairs, both cases, including the extremes of the range.
         {<<"\\ud83d\\ude00">>, <<"😀"/utf8>>}, {<<"\\uD83D\\uDE00">>, <<"😀"/utf8>>},
         {<<"\\ud834\\udd1e">>, <<16#1D11E/utf8>>},
         {<<"\\ud800\\udc00">>, <<16#10000/utf8>>},
         {<<"\\udbff\\udfff">>, <<16#10FFFF/utf8>>},
         %% Escapes mixed with plain runs, and back to back.
         {<<"a\\nb\\tc">>, <<"a\nb\tc">>}, {<<"\\n\\n">>, <<"\n\n">>},
         {<<"x\\u00e9y\\ud83d\\ude00z">>, <<"xéy😀z"/utf8>>},
         {<<"\\\\u0041">>, <<"\\u0041">>}],
    [{title(Esc),
      ?_assertEqual({ok, Out}, tailscale_json:decode(<<$", Esc/binary, $">>))}
     || {Esc, Out} <- Cases].

%%% Invalid documents: {Input, Position, What}

-spec invalid_test_() -> tests().
invalid_test_() ->
    Cases =
        [{<<>>, 0, unexpected_end}, {<<"  ">>, 2, unexpected_end},
         {<<"x">>, 0, {unexpected_byte, $x}}, {<<"tru">>, 0, {unexpected_byte, $t}},
         {<<"True">>, 0, {unexpected_byte, $T}}, {<<"nul">>, 0, {unexpected_byte, $n}},
         {<<"NaN">>, 0, {unexpected_byte, $N}}, {<<"Infinity">>, 0, {unexpected_byte, $I}},
         {<<"'a'">>, 0, {unexpected_byte, $'}},
         {<<"truex">>, 4, trailing_data}, {<<"1 2">>, 2, trailing_data},
         {<<"{} {}">>, 3, trailing_data}, {<<"[]]">>, 2, trailing_data},
         {<<"null\x00">>, 4, trailing_data},
         %% Whitespace is only space, tab, CR and LF.
         {<<"\f1">>, 0, {unexpected_byte, $\f}}, {<<"1\v">>, 1, trailing_data},
         {<<"[1,\xa0 2]">>, 3, {unexpected_byte, 16#a0}},
         %% Numbers.
         {<<"01">>, 0, leading_zero}, {<<"-01">>, 1, leading_zero},
         {<<"00">>, 0, leading_zero}, {<<"+1">>, 0, {unexpected_byte, $+}},
         {<<"-">>, 1, invalid_number}, {<<"-a">>, 1, invalid_number},
         {<<"--1">>, 1, invalid_number}, {<<".5">>, 0, {unexpected_byte, $.}},
         {<<"1.">>, 1, invalid_number}, {<<"1.e5">>, 1, invalid_number},
         {<<"1e">>, 1, invalid_number}, {<<"1e+">>, 1, invalid_number},
         {<<"1E-">>, 1, invalid_number}, {<<"1ee5">>, 1, invalid_number},
         {<<"1.5.5">>, 3, trailing_data}, {<<"0x10">>, 1, trailing_data},
         {<<"1e5.5">>, 3, trailing_data}, {<<"[1.]">>, 2, invalid_number},
         {<<"1e400">>, 0, number_out_of_range}, {<<"[-1.5e99999]">>, 1, number_out_of_range},
         %% Strings.
         {<<"\"">>, 1, unexpected_end}, {<<"\"abc">>, 4, unexpected_end},
         {<<"\"abc\\">>, 5, unexpected_end}, {<<"\"\\x\"">>, 1, invalid_escape},
         {<<"\"\\U0041\"">>, 1, invalid_escape}, {<<"\"\\u12\"">>, 1, invalid_escape},
         {<<"\"\\u12">>, 1, invalid_escape}, {<<"\"\\u00g0\"">>, 1, invalid_escape},
         {<<"\"\\u+123\"">>, 1, invalid_escape}, {<<"\"\\u-123\"">>, 1, invalid_escape},
         {<<"\"\\'\"">>, 1, invalid_escape}, {<<"\"\\0\"">>, 1, invalid_escape},
         {<<"\"a\nb\"">>, 2, unescaped_control_character},
         {<<"\"\t\"">>, 1, unescaped_control_character},
         {<<"\"\x00\"">>, 1, unescaped_control_character},
         {<<"\"\x1f\"">>, 1, unescaped_control_character},
         %% Lone and misordered surrogates.
         {<<"\"\\ud83d\"">>, 1, lone_surrogate}, {<<"\"\\ude00\"">>, 1, lone_surrogate},
         {<<"\"\\ud83dx\"">>, 1, lone_surrogate},
         {<<"\"\\ud83d\\n\"">>, 1, lone_surrogate},
         {<<"\"\\ud83d\\u0041\"">>, 1, lone_surrogate},
         {<<"\"\\ud83d\\ud83d\"">>, 1, lone_surrogate},
         {<<"\"\\ude00\\ud83d\"">>, 1, lone_surrogate},
         {<<"\"ab\\udbff">>, 3, lone_surrogate},
         %% Invalid UTF-8: stray continuation, truncated sequences, overlong
         %% forms, encoded surrogates, beyond U+10FFFF, bytes never valid.
         {<<"\"\x80\"">>, 1, invalid_utf8}, {<<"\"a\xc3\"">>, 2, invalid_utf8},
         {<<"\"\xc3">>, 1, invalid_utf8}, {<<"\"\xe2\x82\"">>, 1, invalid_utf8},
         {<<"\"\xc0\x80\"">>, 1, invalid_utf8}, {<<"\"\xc1\xbf\"">>, 1, invalid_utf8},
         {<<"\"\xe0\x80\x80\"">>, 1, invalid_utf8},
         {<<"\"\xf0\x80\x80\x80\"">>, 1, invalid_utf8},
         {<<"\"\xed\xa0\x80\"">>, 1, invalid_utf8},
         {<<"\"\xed\xbf\xbf\"">>, 1, invalid_utf8},
         {<<"\"\xf4\x90\x80\x80\"">>, 1, invalid_utf8},
         {<<"\"\xfe\"">>, 1, invalid_utf8}, {<<"\"\xff\"">>, 1, invalid_utf8},
         {<<"{\"k\xff\":1}">>, 3, invalid_utf8},
         %% Arrays.
         {<<"[">>, 1, unexpected_end}, {<<"[1">>, 2, unexpected_end},
         {<<"[1,">>, 3, unexpected_end}, {<<"[1,]">>, 3, {unexpected_byte, $]}},
         {<<"[,1]">>, 1, {unexpected_byte, $,}}, {<<"[1 2]">>, 3, {unexpected_byte, $2}},
         {<<"[1,,2]">>, 3, {unexpected_byte, $,}}, {<<"[1}">>, 2, {unexpected_byte, $}}},
         {<<"]">>, 0, {unexpected_byte, $]}},
         %% Objects.
         {<<"{">>, 1, unexpected_end}, {<<"{\"a\"">>, 4, unexpected_end},
         {<<"{\"a\":">>, 5, unexpected_end}, {<<"{\"a\":1">>, 6, unexpected_end},
         {<<"{\"a\":1,">>, 7, unexpected_end},
         {<<"{\"a\":1,}">>, 7, {unexpected_byte, $}}},
         {<<"{,}">>, 1, {unexpected_byte, $,}}, {<<"{a:1}">>, 1, {unexpected_byte, $a}},
         {<<"{'a':1}">>, 1, {unexpected_byte, $'}}, {<<"{1:1}">>, 1, {unexpected_byte, $1}},
         {<<"{\"a\" 1}">>, 5, {unexpected_byte, $1}},
         {<<"{\"a\"=1}">>, 4, {unexpected_byte, $=}},
         {<<"{\"a\":1 \"b\":2}">>, 7, {unexpected_byte, $"}},
         {<<"{\"a\":1]">>, 6, {unexpected_byte, $]}},
         {<<"{\"a\"::1}">>, 5, {unexpected_byte, $:}},
         %% Comments are not JSON.
         {<<"[1/*x*/]">>, 2, {unexpected_byte, $/}}, {<<"1 // x">>, 2, trailing_data}],
    [{title(In),
      ?_assertEqual({error, {invalid_json, Pos, What}}, tailscale_json:decode(In))}
     || {In, Pos, What} <- Cases].

%%% Bounds

%% The heavier tests get a generous timeout instead of EUnit's default 5 s:
%% the machines running them are often busy with other test suites, and their
%% own timing assertions are what guard against quadratic behaviour.

nested(N, Open, Close, Inner) ->
    iolist_to_binary([binary:copy(Open, N), Inner, binary:copy(Close, N)]).

-spec depth_test_() -> tests().
depth_test_() -> {timeout, 120, fun depth/0}.

depth() ->
    Arrays512 = nested(512, <<"[">>, <<"]">>, <<"1">>),
    ?assertMatch({ok, [[_]]}, tailscale_json:decode(Arrays512)),
    ?assertEqual({error, {invalid_json, 512, too_deep}},
                 tailscale_json:decode(nested(513, <<"[">>, <<"]">>, <<"1">>))),
    Objects512 = nested(512, <<"{\"a\":">>, <<"}">>, <<"1">>),
    ?assertMatch({ok, #{<<"a">> := _}}, tailscale_json:decode(Objects512)),
    ?assertMatch({error, {invalid_json, _, too_deep}},
                 tailscale_json:decode(nested(512, <<"{\"a\":">>, <<"}">>, <<"[0]">>))),
    ?assertMatch({error, {invalid_json, _, too_deep}},
                 tailscale_json:decode(nested(300, <<"[{\"a\":">>, <<"}]">>, <<"1">>))),
    %% Hostile inputs fail at the bound without reading (or recursing) further.
    ?assertEqual({error, {invalid_json, 512, too_deep}},
                 tailscale_json:decode(binary:copy(<<"[">>, 1000000))),
    ?assertMatch({error, {invalid_json, _, too_deep}},
                 tailscale_json:decode(binary:copy(<<"{\"\":">>, 1000000))),
    %% Depth is nesting, not count: many siblings are fine.
    Wide = iolist_to_binary([$[, lists:join($,, lists:duplicate(100000, <<"[]">>)), $]]),
    ?assertEqual(100000, length(decode_ok(Wide))).

-spec number_size_test_() -> tests().
number_size_test_() -> {timeout, 120, fun number_size/0}.

number_size() ->
    Max = binary:copy(<<"9">>, 1024),
    ?assertEqual(binary_to_integer(Max), decode_ok(Max)),
    Digits1023 = binary:part(Max, 0, 1023),
    ?assertEqual(-binary_to_integer(Digits1023), decode_ok(<<"-", Digits1023/binary>>)),
    ?assertEqual({error, {invalid_json, 0, number_too_long}},
                 tailscale_json:decode(<<Max/binary, "9">>)),
    ?assertEqual({error, {invalid_json, 1, number_too_long}},
                 tailscale_json:decode(<<"[0.", Max/binary, "]">>)),
    %% binary_to_integer/1 is quadratic on OTP 25: 16 MiB of digits would take
    %% the best part of an hour, so the size check must come first.
    {Micros, Result} = timer:tc(tailscale_json, decode, [binary:copy(<<"1">>, 16#1000000)]),
    ?assertEqual({error, {invalid_json, 0, number_too_long}}, Result),
    ?assert(Micros < 5000000).

%%% Encoding

-spec encode_test_() -> tests().
encode_test_() ->
    Cases =
        [{true, <<"true">>}, {false, <<"false">>}, {null, <<"null">>},
         {hello, <<"\"hello\"">>}, {'a b"c', <<"\"a b\\\"c\"">>},
         {'é', <<"\"é\""/utf8>>},
         {0, <<"0">>}, {-42, <<"-42">>},
         {18446744073709551615, <<"18446744073709551615">>},
         {1.5, <<"1.5">>}, {-0.0, <<"-0.0">>}, {0.1, <<"0.1">>}, {1.0e20, <<"1.0e20">>},
         {1.0e-7, <<"1.0e-7">>},
         {<<>>, <<"\"\"">>}, {<<"plain">>, <<"\"plain\"">>},
         {<<"q\"b\\s/">>, <<"\"q\\\"b\\\\s/\"">>},
         {<<8, 12, 10, 13, 9>>, <<"\"\\b\\f\\n\\r\\t\"">>},
         {<<0, 1, 16#1f, 16#7f>>, <<"\"\\u0000\\u0001\\u001f\x7f\"">>},
         {<<"é€😀"/utf8>>, <<"\"é€😀\""/utf8>>},
         {[], <<"[]">>}, {[1, <<"a">>, [null]], <<"[1,\"a\",[null]]">>},
         {#{}, <<"{}">>}, {#{<<"a">> => #{}}, <<"{\"a\":{}}">>},
         %% Members are sorted, so the output does not depend on map internals.
         {#{id => 1, op => <<"hello">>, <<"client">> => <<"x">>},
          <<"{\"client\":\"x\",\"id\":1,\"op\":\"hello\"}">>},
         {maps:from_list([{integer_to_binary(I), I} || I <- [3, 1, 2]]),
          <<"{\"1\":1,\"2\":2,\"3\":3}">>},
         {#{<<"k\n">> => [#{}]}, <<"{\"k\\n\":[{}]}">>}],
    [?_assertEqual(Out, tailscale_json:encode_to_binary(In)) || {In, Out} <- Cases]
    ++ [?_assertEqual(iolist_to_binary(tailscale_json:encode(In)), Out) || {In, Out} <- Cases].

-spec encode_badarg_test_() -> tests().
encode_badarg_test_() ->
    Pid = self(),
    Bad = <<"ok", 16#ff>>,
    Improper = lists:append([1], 2),       % a literal [1 | 2] upsets Dialyzer
    Cases =
        [{Pid, Pid}, {{a, b}, {a, b}}, {Improper, Improper}, {[{}], {}},
         {make_ref(), any}, {fun() -> ok end, any},
         {Bad, Bad}, {<<16#ed, 16#a0, 16#80>>, any}, {<<"a", 16#c3>>, any},
         {<<1:1>>, any},
         {#{1 => 2}, 1}, {#{"k" => 1}, "k"}, {#{<<"v">> => self()}, Pid},
         {#{Bad => 1}, Bad}, {[#{<<"a">> => [Bad]}], Bad},
         %% An atom key and a binary key naming the same member.
         {#{a => 1, <<"a">> => 2}, #{a => 1, <<"a">> => 2}}],
    [?_test(case Expected of
                any -> ?assertError({badarg, _}, tailscale_json:encode(Term));
                _ -> ?assertError({badarg, Expected}, tailscale_json:encode(Term))
            end)
     || {Term, Expected} <- Cases].

%%% Round trips

-spec round_trip_test_() -> tests().
round_trip_test_() ->
    Terms =
        [null, true, false, 0, -1, 1 bsl 200, -(1 bsl 64), 1.5, -0.0, 1.0e300,
         5.0e-324, 2.2250738585072014e-308, 0.1 + 0.2, 123456789.0,
         <<>>, <<"\"\\/\b\f\n\r\t">>, list_to_binary(lists:seq(0, 127)),
         <<"é€😀\x{10FFFF}"/utf8>>, [], [[], [[]]], #{},
         decode_ok(?HELLO), decode_ok(?ACCEPT), decode_ok(?ERROR)],
    [?_assertEqual({ok, T}, round_trip(T)) || T <- Terms].

-spec atom_round_trip_test() -> ok.
atom_round_trip_test() ->
    ?assertEqual({ok, #{<<"op">> => <<"dial">>, <<"k">> => [<<"v">>, null]}},
                 round_trip(#{op => dial, k => [v, null]})).

%% The encoder writes every control character in a form the decoder reads back.
-spec control_characters_test() -> ok.
control_characters_test() ->
    All = list_to_binary(lists:seq(0, 16#7f)),
    Encoded = tailscale_json:encode_to_binary(All),
    ?assertEqual(nomatch, binary:match(Encoded, [<<C>> || C <- lists:seq(0, 16#1f)])),
    ?assertEqual({ok, All}, tailscale_json:decode(Encoded)).

%% decode(encode(T)) =:= T, exactly, for random terms: =:= (unlike ==) tells
%% 1 from 1.0 and -0.0 from 0.0.
round_trip(T) ->
    tailscale_json:decode(tailscale_json:encode_to_binary(T)).

-spec random_round_trip_test_() -> tests().
random_round_trip_test_() -> {timeout, 120, fun random_round_trip/0}.

random_round_trip() ->
    _ = rand:seed(exsss, {1, 2, 3}),
    lists:foreach(fun(_) ->
                          T = random_term(4),
                          {ok, Back} = round_trip(T),
                          ?assert(Back =:= T)
                  end, lists:seq(1, 2000)).

random_term(0) -> random_leaf();
random_term(Depth) ->
    case rand:uniform(4) of
        1 -> [random_term(Depth - 1) || _ <- lists:seq(1, rand:uniform(5) - 1)];
        2 -> maps:from_list([{random_string(), random_term(Depth - 1)}
                             || _ <- lists:seq(1, rand:uniform(5) - 1)]);
        _ -> random_leaf()
    end.

random_leaf() ->
    case rand:uniform(8) of
        1 -> lists:nth(rand:uniform(3), [null, true, false]);
        2 -> rand:uniform(2001) - 1001;
        3 -> (rand:uniform(2) * 2 - 3) * rand:uniform(1 bsl 70);
        4 -> (rand:uniform() - 0.5) * math:pow(10, rand:uniform(600) - 300);
        5 -> (rand:uniform(2001) - 1001) / 8;
        _ -> random_string()
    end.

random_string() ->
    << <<(random_char())/utf8>> || _ <- lists:seq(1, rand:uniform(12) - 1) >>.

random_char() ->
    case rand:uniform(5) of
        1 -> rand:uniform(16#20) - 1;
        2 -> lists:nth(rand:uniform(3), [$", $\\, $/]);
        3 -> 16#7f + rand:uniform(16#D7FF - 16#7f);
        4 -> 16#FFFF + rand:uniform(16#10FFFF - 16#FFFF);
        5 -> 16#1f + rand:uniform(16#7f - 16#1f)
    end.

%%% Fuzz: decode/1 returns a result for every input, and every value it
%%% returns survives a round trip.

-spec fuzz_mutations_test_() -> tests().
fuzz_mutations_test_() -> {timeout, 120, fun fuzz_mutations/0}.

fuzz_mutations() ->
    _ = rand:seed(exsss, {4, 5, 6}),
    Seeds = [?HELLO, ?ACCEPT, ?ERROR,
             <<"[1,-2.5e-3,\"a\\u00e9\\ud83d\\ude00\\n\",{\"k\":[true,false,null]},{}]">>,
             <<"{\"n\":18446744073709551615,\"f\":1E+2,\"s\":\"é€\",\"e\":[[[]]]}"/utf8>>,
             <<" [ 0 , 0.0 , -0 , \"\\\"\\\\\\/\\b\\f\\n\\r\\t\" ] ">>],
    lists:foreach(fun(_) ->
                          Seed = lists:nth(rand:uniform(length(Seeds)), Seeds),
                          check(mutate(Seed, rand:uniform(3)))
                  end, lists:seq(1, 20000)).

-spec fuzz_random_bytes_test_() -> tests().
fuzz_random_bytes_test_() -> {timeout, 120, fun fuzz_random_bytes/0}.

fuzz_random_bytes() ->
    _ = rand:seed(exsss, {7, 8, 9}),
    %% Mostly JSON's own bytes, so the random strings get past the first byte.
    Alphabet = <<"{}[]\":,\\/ \t\n0123456789-+.eEtrufalsnbu\"\"\xc3\xa9\xed\xa0\x80\xff">>,
    lists:foreach(fun(_) ->
                          Len = rand:uniform(40) - 1,
                          check(<< <<(random_byte(Alphabet))>> || _ <- lists:seq(1, Len) >>)
                  end, lists:seq(1, 20000)).

random_byte(Alphabet) ->
    case rand:uniform(4) of
        1 -> rand:uniform(256) - 1;
        _ -> binary:at(Alphabet, rand:uniform(byte_size(Alphabet)) - 1)
    end.

mutate(Bin, 0) -> Bin;
mutate(<<>>, N) -> mutate(<<"[">>, N - 1);
mutate(Bin, N) ->
    Size = byte_size(Bin),
    Pos = rand:uniform(Size + 1) - 1,
    <<Before:Pos/binary, After/binary>> = Bin,
    Byte = random_byte(<<"{}[]\":,\\0-.eu \x80">>),
    Mutated =
        case {rand:uniform(5), After} of
            {1, <<_, Rest/binary>>} -> <<Before/binary, Byte, Rest/binary>>;
            {2, _} -> <<Before/binary, Byte, After/binary>>;
            {3, <<_, Rest/binary>>} -> <<Before/binary, Rest/binary>>;
            {4, _} -> Before;
            {_, _} -> <<Before/binary, (binary:part(Bin, 0, rand:uniform(Size)))/binary,
                        After/binary>>
        end,
    mutate(Mutated, N - 1).

check(Bin) ->
    case tailscale_json:decode(Bin) of
        {ok, Value} ->
            ?assertEqual({ok, Value}, round_trip(Value));
        {error, {invalid_json, Pos, _What}} ->
            ?assert(Pos >= 0 andalso Pos =< byte_size(Bin))
    end.

%%% Speed: a rough guard against accidental quadratic behaviour.

-spec large_document_test_() -> tests().
large_document_test_() -> {timeout, 120, fun large_document/0}.

large_document() ->
    Doc = tailscale_json:encode_to_binary(
            [decode_ok(?ACCEPT) || _ <- lists:seq(1, 20000)]
            ++ [binary:copy(<<"long string é \\n "/utf8>>, 100000)]),
    ?assert(byte_size(Doc) > 5000000),
    {Micros, {ok, Value}} = timer:tc(tailscale_json, decode, [Doc]),
    ?assertEqual(20001, length(Value)),
    ?assert(Micros < 10000000).
