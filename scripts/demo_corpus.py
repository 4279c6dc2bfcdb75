"""Procedural training text for edgelora's built-in demo model.

``generate_corpus(n_docs, seed)`` returns a deterministic list of short documents, built from
templates and word lists with ``random.Random(seed)`` (standard library only, no downloads):

* about 80% are simple children's stories in the style "Once upon a time, there was a little dog
  named Max. Max liked to play in the park. One day, he found a red ball..." (3-8 sentences, a
  few hundred distinct words, many sentence templates, consistent names and pronouns within a
  story), so that a tiny model learns simple English grammar rather than memorising text;
* about 20% are short question/answer dialogues in the chat format used by the demo model's
  ``chat_template``::

      <|user|>
      Tom has a red ball. What colour is the ball?
      <|assistant|>
      The ball is red.</s>

  where the answer is derived from the one-sentence context in the question (colours, counts,
  places, pets, food, feelings, yes/no questions), plus greetings and requests for very short
  stories; a dialogue has one to four such turns. This teaches the model the chat format, for
  the LoRA adapter demos. (Stories often restate a colour, "a red ball ... The ball was red.",
  which helps the tiny model learn to look such details up.)

Stories carry no end marker (the trainer appends ``</s>``); dialogues end with ``</s>`` after
every assistant turn, exactly as the chat template renders them.

The corpus exists so that ``scripts/train_demo_model.py`` can retrain the demo checkpoint from
nothing but this repository. Run ``python scripts/demo_corpus.py OUT.txt [--docs N] [--seed S]``
to write it to a file (documents separated by blank lines) for inspection.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------------------------

BOY_NAMES = ["Tom", "Max", "Ben", "Sam", "Leo", "Jack", "Tim", "Finn", "Noah", "Oliver", "Jake",
             "Luke", "Ryan", "Adam", "Peter", "Henry", "Oscar", "Hugo", "Theo", "Charlie", "Billy",
             "Danny", "Eli", "Toby", "Milo", "Jasper", "Felix", "Owen", "Liam", "Harry"]
GIRL_NAMES = ["Lily", "Sue", "Mia", "Anna", "Emma", "Lucy", "Sara", "Amy", "Ella", "Zoe", "Rose",
              "Kate", "Molly", "Daisy", "Grace", "Chloe", "Ruby", "Ivy", "Nora", "Hannah", "Sophie",
              "Alice", "Jane", "Maya", "Lola", "Polly", "Clara", "Emily", "Olivia", "Bella"]

# (singular, plural) animals that can be story heroes, pets or friends.
ANIMALS = [("dog", "dogs"), ("cat", "cats"), ("bunny", "bunnies"), ("bird", "birds"),
           ("bear", "bears"), ("fox", "foxes"), ("frog", "frogs"), ("duck", "ducks"),
           ("mouse", "mice"), ("owl", "owls"), ("pig", "pigs"), ("cow", "cows"),
           ("horse", "horses"), ("lion", "lions"), ("tiger", "tigers"), ("monkey", "monkeys"),
           ("elephant", "elephants"), ("turtle", "turtles"), ("squirrel", "squirrels"),
           ("puppy", "puppies"), ("kitten", "kittens"), ("sheep", "sheep"), ("goat", "goats"),
           ("hen", "hens"), ("deer", "deer"), ("fish", "fish"), ("dragon", "dragons"),
           ("penguin", "penguins"), ("giraffe", "giraffes"), ("zebra", "zebras"),
           ("panda", "pandas"), ("wolf", "wolves"), ("snail", "snails"), ("bee", "bees"),
           ("butterfly", "butterflies")]
PEOPLE = ["girl", "boy"]  # the hero's kind when the hero is a child

# Places: (noun, phrase for "being there").
PLACES = [("park", "in the park"), ("garden", "in the garden"), ("forest", "in the forest"),
          ("beach", "at the beach"), ("school", "at school"), ("farm", "on the farm"),
          ("lake", "by the lake"), ("river", "by the river"), ("hill", "on the hill"),
          ("field", "in the field"), ("yard", "in the yard"), ("kitchen", "in the kitchen"),
          ("house", "in the house"), ("zoo", "at the zoo"), ("shop", "at the shop"),
          ("market", "at the market"), ("pond", "by the pond"), ("playground", "at the playground"),
          ("library", "at the library"), ("meadow", "in the meadow"), ("town", "in the town"),
          ("village", "in the village"), ("jungle", "in the jungle"), ("cave", "in the cave"),
          ("castle", "in the castle"), ("woods", "in the woods"), ("sea", "by the sea"),
          ("mountain", "on the mountain"), ("street", "on the street"), ("bedroom", "in the bedroom")]

# (singular, plural) small objects a character can find, lose, give or play with.
OBJECTS = [("ball", "balls"), ("hat", "hats"), ("box", "boxes"), ("kite", "kites"),
           ("book", "books"), ("toy", "toys"), ("car", "cars"), ("cup", "cups"),
           ("shoe", "shoes"), ("sock", "socks"), ("bag", "bags"), ("key", "keys"),
           ("flower", "flowers"), ("stone", "stones"), ("shell", "shells"), ("leaf", "leaves"),
           ("feather", "feathers"), ("balloon", "balloons"), ("crayon", "crayons"),
           ("drum", "drums"), ("boat", "boats"), ("doll", "dolls"), ("bell", "bells"),
           ("ring", "rings"), ("coat", "coats"), ("scarf", "scarves"), ("blanket", "blankets"),
           ("pencil", "pencils"), ("bucket", "buckets"), ("truck", "trucks"), ("train", "trains"),
           ("block", "blocks"), ("star", "stars"), ("map", "maps"), ("lamp", "lamps"),
           ("bowl", "bowls"), ("spoon", "spoons"), ("brush", "brushes"), ("rope", "ropes"),
           ("bike", "bikes"), ("sled", "sleds"), ("umbrella", "umbrellas"), ("button", "buttons"),
           ("ribbon", "ribbons"), ("jar", "jars"), ("basket", "baskets"), ("whistle", "whistles"),
           ("puzzle", "puzzles"), ("robot", "robots"), ("teddy bear", "teddy bears")]
COLOURS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "black", "brown",
           "gold", "silver"]
SIZES = ["little", "small", "big", "tiny", "huge"]
TRAITS = ["happy", "kind", "brave", "curious", "shy", "funny", "clever", "gentle", "friendly",
          "silly", "quiet", "busy", "sleepy", "cheerful", "playful", "smart", "helpful", "lazy",
          "proud", "grumpy"]
NICE = ["nice", "pretty", "shiny", "soft", "new", "old", "special", "beautiful", "strange",
        "magic", "fluffy", "bright", "round", "long", "heavy", "light"]
FEELINGS = ["happy", "sad", "scared", "excited", "angry", "proud", "tired", "surprised", "lonely",
            "worried", "glad", "calm", "upset", "nervous", "thankful", "silly", "hungry", "cold",
            "sorry", "bored"]
# Reasons that fit each feeling, for "X felt F because R".
FEELING_REASONS = {
    "happy": ["it was a sunny day", "{pos} friend came to play", "{sub} got a new {obj}"],
    "sad": ["{pos} {obj} was broken", "it was raining", "{pos} friend went away"],
    "scared": ["the night was dark", "there was a loud noise", "a big {ani} growled"],
    "excited": ["it was {pos} birthday", "they were going to the {place}", "{sub} got a new {obj}"],
    "angry": ["someone took {pos} {obj}", "{pos} tower fell down", "the {ani} ate {pos} lunch"],
    "proud": ["{sub} won the race", "{sub} built a tall tower", "{sub} helped {pos} friend"],
    "tired": ["{sub} played all day", "{sub} walked to the {place}", "it was late"],
    "surprised": ["there was a cake on the table", "{pos} friend came home early",
                  "the {obj} could talk"],
    "lonely": ["nobody came to play", "{pos} friend was away", "the house was empty"],
    "worried": ["{pos} {obj} was lost", "the sky was very dark", "{pos} {ani} was sick"],
    "glad": ["the rain stopped", "{pos} friend came back", "{sub} found {pos} {obj}"],
    "calm": ["the lake was quiet", "the music was soft", "the wind was gentle"],
    "upset": ["{pos} {obj} fell in the mud", "the game ended", "{pos} kite was stuck"],
    "nervous": ["it was the first day of school", "{sub} had to sing a song", "the bridge was high"],
    "thankful": ["{pos} friend helped {obj_pron}", "{pos} mom made soup", "{sub} got a warm coat"],
    "silly": ["{sub} wore a funny hat", "{sub} made a funny face", "the {ani} danced"],
    "hungry": ["{sub} did not eat lunch", "{sub} played all morning", "the soup smelled good"],
    "cold": ["it was snowing", "{sub} lost {pos} coat", "the wind was strong"],
    "sorry": ["{sub} broke the cup", "{sub} was not nice to {pos} friend", "{sub} forgot the gift"],
    "bored": ["it was raining all day", "there was nothing to do", "{pos} toys were put away"],
}
FOODS = ["apples", "bananas", "cookies", "cake", "bread", "soup", "carrots", "cheese", "honey",
         "pie", "grapes", "pears", "rice", "pizza", "eggs", "milk", "berries", "corn", "candy",
         "ice cream", "peas", "oranges", "sandwiches", "pancakes", "nuts", "jam", "plums",
         "lemons", "beans", "muffins"]
# Foods that take a singular verb ("the cake was"); the others are plurals ("the apples were").
MASS_FOODS = {"cake", "bread", "soup", "cheese", "honey", "pie", "rice", "pizza", "milk", "corn",
              "candy", "ice cream", "jam"}
# Activities: (base form, -ing form).
ACTIVITIES = [("play", "playing"), ("run", "running"), ("jump", "jumping"), ("sing", "singing"),
              ("dance", "dancing"), ("swim", "swimming"), ("read", "reading"), ("draw", "drawing"),
              ("paint", "painting"), ("climb", "climbing"), ("dig", "digging"), ("hop", "hopping"),
              ("fly kites", "flying kites"), ("ride a bike", "riding a bike"),
              ("build towers", "building towers"), ("look at the stars", "looking at the stars"),
              ("pick flowers", "picking flowers"), ("bake cookies", "baking cookies"),
              ("play games", "playing games"), ("splash in puddles", "splashing in puddles"),
              ("play hide and seek", "playing hide and seek"), ("roll in the grass", "rolling in the grass"),
              ("chase butterflies", "chasing butterflies"), ("collect shells", "collecting shells"),
              ("play with blocks", "playing with blocks"), ("tell stories", "telling stories")]
WEATHER = ["sunny", "rainy", "windy", "snowy", "cloudy", "warm", "cold", "bright"]
TIMES = ["One day", "One morning", "One afternoon", "One evening", "One sunny day", "One rainy day",
         "Later that day", "The next day", "One summer day", "One winter morning", "After lunch"]
HIDING = ["under the bed", "behind the tree", "in the box", "under a big leaf", "near the door",
          "behind the sofa", "under the table", "in the grass", "next to the rock", "in the bushes",
          "on top of the shelf", "inside a hole"]
STUCK = ["up in a tall tree", "on the roof", "in the mud", "at the bottom of the pond",
         "behind a big rock", "on a high shelf", "in a thorny bush", "under the fence"]
HOMES = ["in a small house", "in a big town", "in a little village", "by the sea", "in the forest",
         "on a farm", "in a cozy home", "near a big lake", "at the edge of the woods", "on a quiet street"]
PRAISE = ["Thank you", "Thank you so much", "You are a good friend", "You are so kind",
          "I am so happy", "You saved my day"]
EXCLAIM = ["Oh no", "Look", "Wow", "Oh dear", "Yay", "Hello", "Oh my", "Hooray"]
ADVERBS = ["slowly", "quickly", "happily", "carefully", "quietly", "loudly", "softly", "gently"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
MORALS = ["sharing is good", "it is good to help others", "friends make everything better",
          "it is good to be kind", "being brave is not so hard", "it is fun to try new things",
          "it is good to say sorry", "it is good to be careful", "working together is best",
          "it is good to tell the truth"]


def article(word: str) -> str:
    """``a`` or ``an`` for the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


def a(phrase: str) -> str:
    """The phrase with its indefinite article: ``a red ball``, ``an orange hat``."""
    return f"{article(phrase)} {phrase}"


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


# --------------------------------------------------------------------------------------------
# Characters
# --------------------------------------------------------------------------------------------

@dataclass
class Character:
    name: str
    kind: str        # "girl", "boy", or an animal noun
    sub: str         # he / she
    obj: str         # him / her
    pos: str         # his / her

    @property
    def is_child(self) -> bool:
        return self.kind in PEOPLE


def make_character(rng: random.Random, kind: str | None = None, avoid: tuple[str, ...] = ()) -> Character:
    """A named character with matching pronouns; never a name in ``avoid``.

    ``kind``: an animal noun, ``"child"`` (a girl or a boy, by the name drawn), or None (either).
    """
    girl = rng.random() < 0.5
    while True:
        name = rng.choice(GIRL_NAMES if girl else BOY_NAMES)
        if name not in avoid:
            break
    if kind is None:
        kind = "child" if rng.random() < 0.45 else rng.choice(ANIMALS)[0]
    if kind == "child":
        kind = "girl" if girl else "boy"
    return Character(name, kind, "she" if girl else "he", "her" if girl else "him", "her" if girl else "his")


# --------------------------------------------------------------------------------------------
# Stories
# --------------------------------------------------------------------------------------------

class StoryWriter:
    """Builds one story: an opening, a middle from one of several plots, an ending.

    Every sentence is chosen among several templates; the hero, a friend, an object and a place
    are fixed for the story so that names, pronouns and nouns stay consistent.
    """

    def __init__(self, rng: random.Random, hero_kind: str | None = None):
        self.r = rng
        self.hero = make_character(rng, hero_kind)
        self.friend = make_character(rng, avoid=(self.hero.name,))
        self.obj, self.objs = rng.choice(OBJECTS)
        self.colour = rng.choice(COLOURS)
        self.place, self.at_place = rng.choice(PLACES)
        self.activity, self.activity_ing = rng.choice(ACTIVITIES)
        self.food = rng.choice(FOODS)

    # -- helpers ---------------------------------------------------------------------------
    def pick(self, *options: str) -> str:
        return self.r.choice(options)

    def who(self, c: Character) -> str:
        """How a character is introduced: "a little dog named Max", "a kind girl called Lily"."""
        adj = self.r.choice(SIZES + TRAITS)
        called = self.r.choice(["named", "named", "called"])
        return f"{a(adj + ' ' + c.kind)} {called} {c.name}"

    def friend_desc(self) -> str:
        f = self.friend
        return f.name if f.is_child else f"{f.name} the {f.kind}"

    def thing(self) -> str:
        return f"{self.colour} {self.obj}"

    # -- opening ---------------------------------------------------------------------------
    def opening(self, friend_known: bool = True) -> list[str]:
        """Two sentences introducing the hero (and the friend only when ``friend_known``)."""
        h = self.hero
        first = self.pick(
            f"Once upon a time, there was {self.who(h)}.",
            f"Once upon a time, there was {self.who(h)}.",
            f"Once upon a time, {self.who(h)} lived {self.r.choice(HOMES)}.",
            f"There once was {self.who(h)}.",
            f"{h.name} was {a(self.r.choice(TRAITS) + ' ' + h.kind)}.",
            f"Once there was {self.who(h)} who lived {self.r.choice(HOMES)}.",
        )
        seconds = [
            f"{h.name} liked to {self.activity} {self.at_place}.",
            f"{cap(h.sub)} loved to {self.activity} every day.",
            f"{h.name} loved {self.food} more than anything.",
            f"{cap(h.sub)} had {a(self.thing())} that {h.sub} loved very much.",
            f"{h.name} liked to play {self.at_place} with {h.pos} friends.",
            f"{cap(h.pos)} favourite colour was {self.colour}.",
        ]
        if friend_known:
            seconds.append(f"Every day, {h.sub} liked {self.activity_ing} with {h.pos} friend {self.friend_desc()}.")
        return [first, self.r.choice(seconds)]

    # -- plots -----------------------------------------------------------------------------
    def plot_found(self) -> list[str]:
        h, f = self.hero, self.friend
        s = [f"{self.r.choice(TIMES)}, {h.sub} {self.pick('found', 'saw', 'spotted')} {article(self.colour)} "
             f"{self.thing()} {self.r.choice(HIDING)}."]
        s.append(self.pick(
            f"\"{self.r.choice(EXCLAIM)}, what {a(self.r.choice(NICE) + ' ' + self.obj)}!\" said {h.name}.",
            f"The {self.obj} was {self.r.choice(NICE)} and {self.colour}.",
            f"The {self.obj} was {self.colour} and very {self.r.choice(NICE)}.",
            f"{h.name} picked up the {self.obj} and looked at it {self.r.choice(ADVERBS)}.",
            f"{cap(h.sub)} wanted to show it to {h.pos} {self.pick('mom', 'dad', 'friend ' + f.name, 'sister', 'brother')}.",
        ))
        s.append(self.pick(
            f"{cap(h.sub)} ran to {f.name} and said, \"Look what I found!\"",
            f"{f.name} saw the {self.obj} and wanted to play with it too.",
            f"{cap(h.sub)} asked {f.name}, \"Do you want to play with my {self.obj}?\"",
            f"Then {h.sub} saw {f.name}, who looked {self.pick('sad', 'lonely', 'bored')}.",
        ))
        s.append(self.pick(
            f"They played with the {self.obj} {self.at_place} all day.",
            f"{h.name} and {f.name} shared the {self.obj} and had lots of fun.",
            f"{h.name} gave the {self.obj} to {f.name}, and {f.sub} smiled.",
            f"They took turns with the {self.obj} and laughed a lot.",
        ))
        return s

    def plot_lost(self) -> list[str]:
        h, f = self.hero, self.friend
        s = [f"{self.r.choice(TIMES)}, {h.name} could not find {h.pos} {self.thing()}."]
        looked, found = self.r.sample(HIDING, 2)  # where it was not, where it was
        s.append(self.pick(
            f"{cap(h.sub)} looked {looked}, but it was not there.",
            f"{cap(h.sub)} felt {self.pick('sad', 'worried', 'upset')} and started to cry.",
            f"\"Where is my {self.obj}?\" asked {h.name}.",
        ))
        s.append(self.pick(
            f"{f.name} came and said, \"I will help you look.\"",
            f"{h.pos.capitalize()} friend {self.friend_desc()} wanted to help.",
            f"Then {f.name} {self.pick('came by', 'walked by', 'saw ' + h.obj)} and asked what was wrong.",
        ))
        s.append(self.pick(
            f"They looked {found} and found the {self.obj}!",
            f"At last, {f.name} found the {self.obj} {found}.",
            f"Together, they found the {self.obj} {found}.",
        ))
        s.append(self.pick(
            f"\"{self.r.choice(PRAISE)}!\" said {h.name}.",
            f"{h.name} hugged {f.name} and said, \"{self.r.choice(PRAISE)}!\"",
            f"{h.name} was very happy to have {h.pos} {self.obj} back.",
        ))
        return s

    def plot_stuck(self) -> list[str]:
        h, f = self.hero, self.friend
        where = self.r.choice(STUCK)
        s = [f"{self.r.choice(TIMES)}, {h.name}'s {self.obj} got stuck {where}."]
        s.append(self.pick(
            f"{cap(h.sub)} tried to get it, but {h.sub} was too {self.pick('small', 'short', 'little')}.",
            f"{cap(h.sub)} jumped and jumped, but {h.sub} could not reach it.",
            f"\"{self.r.choice(['Oh no', 'Oh dear'])}! My {self.obj}!\" cried {h.name}.",
        ))
        s.append(self.pick(
            f"Then {self.friend_desc()} came to help.",
            f"{f.name} saw {h.obj} and said, \"Do not worry, I can help.\"",
            f"{cap(h.sub)} asked {f.name} for help.",
        ))
        s.append(self.pick(
            f"{f.name} used a long stick to get the {self.obj}.",
            f"{f.name} climbed up and got the {self.obj} back.",
            f"They worked together and got the {self.obj} out.",
            f"{f.name} pulled {self.r.choice(ADVERBS)}, and the {self.obj} came free.",
        ))
        s.append(self.pick(
            f"{h.name} learned that {self.r.choice(MORALS)}.",
            f"\"{self.r.choice(PRAISE)}!\" said {h.name}.",
            f"{h.name} and {f.name} played with the {self.obj} until the sun went down.",
        ))
        return s

    def plot_friend(self) -> list[str]:
        h, f = self.hero, self.friend
        s = [f"{self.r.choice(TIMES)}, {h.sub} met {self.who(f)} {self.at_place}."]
        s.append(self.pick(
            f"{f.name} looked {self.pick('sad', 'lonely', 'shy', 'lost')}.",
            f"{f.name} was sitting alone under a tree.",
            f"{f.name} did not have anyone to play with.",
        ))
        s.append(self.pick(
            f"\"Hello, do you want to play with me?\" asked {h.name}.",
            f"{h.name} said, \"Hi, my name is {h.name}. What is your name?\"",
            f"{h.name} walked up to {f.obj} and smiled.",
        ))
        s.append(self.pick(
            f"{f.name} smiled and said, \"Yes, I would like that!\"",
            f"\"I am {f.name},\" said the {f.kind}. \"Let us play!\"",
            f"{f.name} was {self.pick('happy', 'glad')} to have a new friend.",
        ))
        s.append(self.pick(
            f"They spent the whole day {self.activity_ing} together.",
            f"They played {self.at_place} until it was time to go home.",
            f"From that day on, {h.name} and {f.name} were best friends.",
        ))
        return s

    def plot_weather(self) -> list[str]:
        h, f = self.hero, self.friend
        rainy = self.r.random() < 0.5
        if rainy:
            s = [f"{self.r.choice(['One day', 'One morning', 'One afternoon'])}, it started to rain."]
            s.append(self.pick(
                f"{h.name} could not go outside to {self.activity}.",
                f"{h.name} looked out of the window and felt {self.pick('sad', 'bored')}.",
            ))
            s.append(self.pick(
                f"Then {h.pos} mom said, \"Let us {self.pick('bake a cake', 'read a book', 'build a fort', 'draw a picture')} instead.\"",
                f"So {h.sub} {self.pick('put on a ' + self.colour + ' coat', 'took a big umbrella')} and went out to jump in the puddles.",
                f"{f.name} came over, and they played games inside.",
            ))
            s.append(self.pick(
                f"Soon the rain stopped, and a big rainbow came out.",
                f"They had so much fun that they forgot about the rain.",
                f"When the sun came back, they ran outside to {self.activity}.",
            ))
        else:
            weather = self.r.choice(["sunny", "warm", "bright", "windy", "snowy"])
            s = [f"{self.r.choice(['One day', 'One morning', 'One afternoon'])}, it was {weather} outside."]
            extra = {"windy": f"It was a good day to fly {article(self.colour)} {self.colour} kite.",
                     "snowy": f"{h.name} wanted to build a big snowman {self.at_place}."}
            s.append(extra.get(weather, f"{h.name} wanted to go {self.pick('to the ' + self.place, 'outside', 'for a walk')}."))
            s.append(self.pick(
                f"{cap(h.sub)} asked {f.name} to come too.",
                f"{cap(h.sub)} took {h.pos} {self.thing()} and went out.",
                f"{cap(h.sub)} put on {h.pos} {self.pick('hat', 'coat', 'boots', 'scarf')} and ran outside.",
            ))
            s.append(self.pick(
                f"{h.name} and {f.name} had a lot of fun {self.activity_ing}.",
                f"They saw {self.r.choice(NUMBERS[1:6])} {self.r.choice(ANIMALS)[1]} {self.at_place}.",
                f"The sun was warm, and the sky was blue.",
                f"They played until they were {self.pick('tired', 'hungry', 'very tired')}.",
            ))
        return s

    def plot_food(self) -> list[str]:
        h, f = self.hero, self.friend
        mass = self.food in MASS_FOODS
        s = [f"{self.r.choice(TIMES)}, {h.name} was very hungry."]
        s.append(self.pick(
            f"{cap(h.sub)} wanted to eat some {self.food}.",
            f"{cap(h.sub)} went to the kitchen to look for {self.food}.",
            f"{h.pos.capitalize()} mom was making {self.food} for lunch.",
        ))
        s.append(self.pick(
            f"{f.name} was hungry too, so {h.name} shared {h.pos} {self.food}.",
            f"But there {'was only a little' if mass else 'were only a few'} {self.food} left.",
            f"{cap(h.sub)} put the {self.food} in {article(self.colour)} {self.colour} bowl.",
        ))
        s.append(self.pick(
            f"They ate the {self.food} together and smiled.",
            f"The {self.food} {'was' if mass else 'were'} {self.pick('yummy', 'sweet', 'warm', 'very good')}.",
            f"\"This is so good!\" said {f.name}.",
        ))
        s.append(self.pick(
            f"{h.name} learned that sharing is good.",
            f"After lunch, they went {self.pick('to the ' + self.place, 'outside')} to {self.activity}.",
            f"Then they had a nap.",
        ))
        return s

    def plot_trip(self) -> list[str]:
        h, f = self.hero, self.friend
        s = [f"{self.r.choice(TIMES)}, {h.name} and {h.pos} {self.pick('mom', 'dad', 'family', 'friend ' + f.name)} "
             f"went to the {self.place}."]
        a2, a2s = self.r.choice(ANIMALS)
        s.append(self.pick(
            f"There {self.pick('they', h.sub)} saw {a(self.r.choice(SIZES + COLOURS) + ' ' + a2)}.",
            f"{h.name} saw {self.r.choice(NUMBERS[1:6])} {a2s} {self.r.choice(['playing', 'sleeping', 'eating', 'running'])} there.",
            f"It was {self.pick('big', 'quiet', 'busy', 'beautiful', 'very pretty')} {self.at_place}.",
        ))
        s.append(self.pick(
            f"{cap(h.sub)} {self.pick('wanted', 'liked')} to {self.activity} there.",
            f"The {a2} said hello and {self.pick('waved', 'smiled', 'jumped up and down')}.",
            f"{h.name} found {article(self.colour)} {self.thing()} on the ground.",
            f"{cap(h.sub)} bought some {self.food} for everyone.",
        ))
        s.append(self.pick(
            f"When it was time to go home, {h.name} felt {self.pick('happy', 'tired', 'sleepy', 'a little sad')}.",
            f"It was the best day ever.",
            f"{h.name} could not wait to go back to the {self.place}.",
        ))
        return s

    def plot_help(self) -> list[str]:
        h, f = self.hero, self.friend
        s = [f"{self.r.choice(TIMES)}, {h.name} saw that {f.name} was {self.pick('crying', 'sad', 'upset')}."]
        need = self.pick(
            f"{f.pos} {self.obj} was broken", f"{f.sub} could not carry {f.pos} heavy {self.obj}",
            f"{f.sub} was lost {self.at_place}", f"{f.sub} was too cold",
            f"{f.sub} could not reach the {self.food}")
        s.append(f"{cap(need)}.")
        s.append(self.pick(
            f"\"Do not be sad, I will help you,\" said {h.name}.",
            f"{h.name} wanted to help {f.obj}.",
            f"{h.name} thought for a moment and had an idea.",
        ))
        s.append(self.pick(
            f"{cap(h.sub)} helped {f.obj}, and soon everything was fine.",
            f"{cap(h.sub)} {self.r.choice(ADVERBS)} helped {f.name}.",
            f"Together, they fixed the problem.",
        ))
        s.append(self.pick(
            f"{f.name} said, \"{self.r.choice(PRAISE)}, {h.name}!\"",
            f"{h.name} felt proud, and {f.name} felt {self.pick('happy', 'thankful', 'glad')}.",
            f"They became good friends.",
        ))
        return s

    def plot_bedtime(self) -> list[str]:
        h = self.hero
        s = [f"At night, {h.name} {self.pick('was very sleepy', 'did not want to sleep', 'looked at the moon')}."]
        s.append(self.pick(
            f"{h.pos.capitalize()} mom read {h.obj} a story about {a(self.r.choice(ANIMALS)[0])}.",
            f"{cap(h.sub)} hugged {h.pos} {self.thing()} and got into bed.",
            f"The stars were bright, and the moon was big and round.",
        ))
        s.append(self.pick(
            f"{cap(h.sub)} thought about {self.activity_ing} {self.at_place} tomorrow.",
            f"{h.pos.capitalize()} dad said, \"Good night, {h.name}. Sweet dreams.\"",
            f"Soon {h.sub} closed {h.pos} eyes.",
        ))
        s.append(self.pick(
            f"{h.name} fell asleep with a big smile.",
            f"That night, {h.sub} dreamed about {self.food} and {self.r.choice(ANIMALS)[1]}.",
            f"{cap(h.sub)} slept well all night.",
        ))
        return s

    PLOTS = ("plot_found", "plot_lost", "plot_stuck", "plot_friend", "plot_weather", "plot_food",
             "plot_trip", "plot_help", "plot_bedtime")

    # -- ending ----------------------------------------------------------------------------
    def ending(self, plot: str) -> str:
        h, f = self.hero, self.friend
        if plot == "plot_bedtime":
            return self.pick("The end.", f"Good night, {h.name}.", f"{h.name} woke up happy the next morning.")
        return self.pick(
            f"{h.name} was very happy.",
            f"From that day on, {h.name} and {f.name} were best friends.",
            f"{h.name} learned that {self.r.choice(MORALS)}.",
            f"It was {a(self.pick('good', 'great', 'happy', 'fun'))} day for {h.name}.",
            f"{h.name} went home and told {h.pos} mom all about it.",
            f"And they all lived happily ever after.",
            f"The end.",
        )

    def restate_colour(self, sentences: list[str]) -> None:
        """Half the time, follow the first mention of "a red ball" with "The ball was red."

        Looking a detail up in earlier text (rather than repeating a phrase) is what the chat
        questions ask for; stories are most of the corpus, so they teach it too.
        """
        if self.r.random() < 0.5 or any(f"The {self.obj} was" in x for x in sentences):
            return
        for i, sentence in enumerate(sentences):
            if f"{self.thing()}" in sentence:
                note = self.pick(f"The {self.obj} was {self.colour}.",
                                 f"The {self.obj} was {self.colour} and {self.r.choice(NICE)}.",
                                 f"{cap(self.hero.pos)} {self.obj} was {self.colour}.")
                sentences.insert(i + 1, note)
                return

    def story(self, max_sentences: int = 8) -> str:
        """One story of 3 to ``max_sentences`` sentences (most have 6-8)."""
        plot = self.r.choice(self.PLOTS)
        sentences = self.opening(friend_known=plot != "plot_friend") + getattr(self, plot)()
        self.restate_colour(sentences)
        ending = self.ending(plot)
        if self.r.random() < 0.7 and ending not in sentences:
            sentences.append(ending)
        # Now and then a shorter story: stop after a random number of sentences (at least 3).
        keep = len(sentences) if self.r.random() < 0.8 else self.r.randint(3, len(sentences))
        return " ".join(sentences[:min(keep, max_sentences)])


# --------------------------------------------------------------------------------------------
# Chat dialogues
# --------------------------------------------------------------------------------------------

USER, ASSISTANT, EOS = "<|user|>", "<|assistant|>", "</s>"


def chat(turns: list[tuple[str, str]]) -> str:
    """Render (question, answer) turns exactly like the demo model's chat template."""
    return "".join(f"{USER}\n{q}\n{ASSISTANT}\n{a}{EOS}" for q, a in turns)


def qa_colour(r: random.Random) -> tuple[str, str]:
    c = make_character(r, "child")
    o, _ = r.choice(OBJECTS)
    col = r.choice(COLOURS)
    ctx = r.choice([f"{c.name} has {article(col)} {col} {o}.", f"{c.name} found {article(col)} {col} {o}.",
                    f"{c.name} bought {article(col)} {col} {o}.", f"The {o} is {col}.",
                    f"{c.name} gave {c.pos} friend {article(col)} {col} {o}."])
    q = r.choice([f"What colour is the {o}?", f"What is the colour of the {o}?"])
    return f"{ctx} {q}", f"The {o} is {col}."


def qa_yes_no(r: random.Random) -> tuple[str, str]:
    c = make_character(r, "child")
    o, _ = r.choice(OBJECTS)
    col = r.choice(COLOURS)
    asked = col if r.random() < 0.5 else r.choice([x for x in COLOURS if x != col])
    ctx = r.choice([f"{c.name} has {article(col)} {col} {o}.", f"The {o} is {col}."])
    ans = f"Yes, the {o} is {col}." if asked == col else f"No, the {o} is {col}."
    return f"{ctx} Is the {o} {asked}?", ans


def qa_who(r: random.Random) -> tuple[str, str]:
    c = make_character(r, "child")
    o, _ = r.choice(OBJECTS)
    col = r.choice(COLOURS)
    verb, past = r.choice([("has", "has"), ("found", "found"), ("lost", "lost"), ("made", "made")])
    ctx = f"{c.name} {verb} {article(col)} {col} {o}."
    q = f"Who has the {o}?" if verb == "has" else f"Who {past} the {o}?"
    return f"{ctx} {q}", f"{c.name} {past} the {o}."


def qa_where(r: random.Random) -> tuple[str, str]:
    c = make_character(r)
    place, at = r.choice(PLACES)
    act, ing = r.choice(ACTIVITIES)
    if r.random() < 0.5:
        ctx, q, a = f"{c.name} is {ing} {at}.", f"Where is {c.name}?", f"{c.name} is {at}."
    else:
        ctx, q, a = (f"{c.name} went to the {place} to {act}.", f"Where did {c.name} go?",
                     f"{c.name} went to the {place}.")
    return f"{ctx} {q}", a


def qa_count(r: random.Random) -> tuple[str, str]:
    c = make_character(r, "child")
    k = r.randrange(2, 11)
    o, os_ = r.choice(OBJECTS)
    n = NUMBERS[k - 1]
    verb = r.choice(["has", "has", "found", "wants"])
    ctx = f"{c.name} {verb} {n} {os_}."
    aux = {"has": "have", "found": "find", "wants": "want"}[verb]
    dq = "did" if verb == "found" else "does"
    return f"{ctx} How many {os_} {dq} {c.name} {aux}?", f"{c.name} {verb} {n} {os_}."


def qa_pet(r: random.Random) -> tuple[str, str]:
    c = make_character(r, "child")
    pet = make_character(r, "dog", avoid=(c.name,))
    animal, _ = r.choice(ANIMALS)
    ctx = f"{c.name} has a pet {animal} named {pet.name}."
    if r.random() < 0.5:
        return f"{ctx} What is the name of the {animal}?", f"The {animal} is named {pet.name}."
    return f"{ctx} What kind of pet does {c.name} have?", f"{c.name} has a pet {animal}."


def qa_food(r: random.Random) -> tuple[str, str]:
    c = make_character(r)
    food = r.choice(FOODS)
    verb = r.choice(["likes to eat", "ate", "wants"])
    ctx = f"{c.name} {verb} {food}."
    q = {"likes to eat": f"What does {c.name} like to eat?", "ate": f"What did {c.name} eat?",
         "wants": f"What does {c.name} want?"}[verb]
    return f"{ctx} {q}", f"{c.name} {verb} {food}."


def qa_feeling(r: random.Random) -> tuple[str, str]:
    c = make_character(r, "child")
    feeling = r.choice(FEELINGS)
    reason = r.choice(FEELING_REASONS[feeling]).format(
        pos=c.pos, sub=c.sub, obj_pron=c.obj, obj=r.choice(OBJECTS)[0], ani=r.choice(ANIMALS)[0],
        place=r.choice(PLACES)[0])
    ctx = f"{c.name} felt {feeling} because {reason}."
    if r.random() < 0.6:
        return f"{ctx} How did {c.name} feel?", f"{c.name} felt {feeling}."
    return f"{ctx} Why did {c.name} feel {feeling}?", f"{cap(c.sub)} felt {feeling} because {reason}."


def qa_story(r: random.Random) -> tuple[str, str]:
    animal, _ = r.choice(ANIMALS)
    writer = StoryWriter(r, hero_kind=r.choice([animal, animal, "child"]))
    label = a(writer.hero.kind)  # "a dog", "an owl", "a girl"
    q = r.choice([f"Tell me a short story about {label}.", f"Can you tell me a story about {label}?",
                  f"Please write a short story about {label}."])
    return q, writer.story(max_sentences=r.choice([3, 4, 5]))


def qa_greeting(r: random.Random) -> tuple[str, str]:
    q = r.choice(["Hello!", "Hi!", "Hello, who are you?", "Hi there!", "Good morning!"])
    a = r.choice(["Hello! How can I help you today?", "Hi! I am a small story model. Ask me a question.",
                  "Hello! I can answer simple questions and tell short stories.",
                  "Hi! What would you like to know?"])
    return q, a


# (maker, weight): copying a colour, number or place out of the context is harder for a tiny
# model than repeating a name, so those questions are drawn more often.
QA_MAKERS = [(qa_colour, 6), (qa_yes_no, 3), (qa_who, 2), (qa_where, 3), (qa_count, 3), (qa_pet, 3),
             (qa_food, 2), (qa_feeling, 3), (qa_story, 2), (qa_greeting, 1)]


def make_dialogue(r: random.Random) -> str:
    """One to four question/answer turns (independent questions), as one chat document.

    Several turns per dialogue give the model more answers to learn from per document while
    dialogues stay about 20% of the documents.
    """
    makers, weights = zip(*QA_MAKERS)
    turns = r.choice([1, 2, 2, 3, 3, 4])
    return chat([r.choices(makers, weights)[0](r) for _ in range(turns)])


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------

CHAT_FRACTION = 0.2


def generate_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """``n_docs`` documents (about 80% stories, 20% chat dialogues), identical for the same seed."""
    r = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        if r.random() < CHAT_FRACTION:
            docs.append(make_dialogue(r))
        else:
            docs.append(StoryWriter(r).story())
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="text file to write (documents separated by blank lines)")
    ap.add_argument("--docs", type=int, default=10000, help="number of documents (default 10000)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = ap.parse_args()
    docs = generate_corpus(args.docs, args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")
    words = {w.strip(".,!?\"'").lower() for d in docs for w in d.split()}
    print(f"wrote {len(docs)} documents, {sum(len(d) for d in docs)} characters, "
          f"{len(words)} distinct words to {args.out}")


if __name__ == "__main__":
    main()
